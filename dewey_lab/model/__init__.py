"""The pipeline's second half: the student encoder, its attention paths, pooling heads, loss terms,
and the LightningModule (``DistillModule``) that joins them."""
