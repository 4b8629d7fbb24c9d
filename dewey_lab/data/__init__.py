"""The pipeline's first half: documents -> windows and chunks -> teacher vectors -> batches.

corpus (sources) -> chunking (chunk spans) -> windows (tokenised once) -> fill (teacher into the
vector store) -> items and collate / packing -> the LightningDataModule that wires them; streaming
is the same path read as an endless, resumable stream.
"""
