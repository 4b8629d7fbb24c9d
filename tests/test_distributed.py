"""Several processes: 2-process DDP and FSDP fits (gloo, CPU) follow the 1-process loss curve with the
same global batch, a killed 2-process fit (DDP, FSDP2, FSDP1: make test-slow) resumes onto the uninterrupted
curve, and two processes filling one teacher cache at once leave one consistent cache."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from faults import ENV, KILLABLE, TINY, loss_curve, run_fit, write_yaml

from dewey_lab.cli import REPO
from dewey_lab.data.store.maintenance import verify
from dewey_lab.data.store.vectors import VectorStore
from dewey_lab.distributed import balance


def test_balance_splits_by_tokens_and_feeds_every_rank():
    lengths = [100, 90, 80, 10, 10, 10, 5, 5]
    parts = balance(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(8))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert sorted(loads) == [140, 170]  # LPT: 100 | 90 + 80, then the short ones to the lighter rank
    assert max(loads) <= 4 / 3 * sum(lengths) / 2  # LPT's bound against the perfect split
    assert all(balance([1, 1, 1000], 3))  # every rank gets a text, however long the others
    with pytest.raises(ValueError, match="global batch|data.batching.batch_size"):
        balance([5], 2)


def _run_config(run: Path, corpus: Path, cache_dir: Path, devices: int, strategy, steps: int = 4,
                batch_size: int = 6, **sections) -> str:
    """A tiny student on the small corpus, ``devices`` CPU processes, logs and checkpoints under ``run``."""
    cfg = {
        "trainer": {"max_steps": steps, "max_epochs": 100, "log_every_n_steps": 1, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "callbacks": [],
                    "accelerator": "cpu", "devices": devices, "strategy": strategy, "use_distributed_sampler": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(run / "runs"), "name": "run"}}},
        "data": {"corpus": {"class_path": "dewey_lab.data.corpus.JsonlCorpus", "init_args": {"path": str(corpus)}},
                 "cache": {"dir": str(cache_dir)}, "windows": {"max_length": 96, "max_windows_per_doc": 3, "val_fraction": 0.2},
                 "batching": {"batch_size": batch_size}},  # texts per step, over all ranks
        "model": {"student": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                         "num_attention_heads": 2}}, "warmup_steps": 2},
        **sections,
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.yaml").write_text(yaml.safe_dump(cfg))
    return str(run / "run.yaml")


# One run shape for every comparison: 15 training windows, 4 texts (2 per rank) per step, so 3 steps an
# epoch; 8 steps; a checkpoint every 2 steps. A kill at step 5 leaves last.ckpt at step 4, one batch into
# epoch 1: the resumed run seeks there, gives each rank its share of the same global batches, and crosses
# into epoch 2.
STEPS = 8
RUN = {"steps": STEPS, "batch_size": 4, "checkpoint": {"every_n_train_steps": 2}}


@pytest.fixture(scope="session")
def single_process_run(small_corpus_path, shared_cache_dir, tmp_path_factory) -> tuple[dict[int, float], Path]:
    """The 1-process reference for the multi-process runs, trained in this process: its loss curve and
    its last.ckpt."""
    from dewey_lab.cli import main

    run = tmp_path_factory.mktemp("single")
    main(["fit", "-c", TINY, "-c", _run_config(run, small_corpus_path, shared_cache_dir, 1, "auto", **RUN)])
    return loss_curve(run / "runs"), run / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def two_process_run(small_corpus_path, shared_cache_dir, tmp_path_factory):
    """``two_process_run(kind)``: the uninterrupted 2-process run of a strategy (``ddp``, ``fsdp2``,
    ``fsdp1``), trained once per session: its run directory and loss curve. The follow tests compare it
    with the 1-process run, and the kill tests resume onto it."""
    done: dict[str, tuple[Path, dict[int, float]]] = {}

    def run(kind: str) -> tuple[Path, dict[int, float]]:
        if kind not in done:
            path = tmp_path_factory.mktemp(f"straight_{kind}")
            out = run_fit(path, _run_config(path, small_corpus_path, shared_cache_dir, 2,
                                            {"ddp": "ddp", **FSDP}[kind], **RUN))
            assert out.returncode == 0, out.stderr[-3000:]
            done[kind] = path, loss_curve(path / "runs")
            assert sorted(done[kind][1]) == list(range(STEPS))
        return done[kind]

    return run


def _relative_difference(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in a)


def test_two_process_ddp_follows_the_single_process_loss(single_process_run, two_process_run):
    single, _ = single_process_run
    _, ddp = two_process_run("ddp")
    assert sorted(single) == sorted(ddp) == list(range(STEPS))
    diff = _relative_difference(single, ddp)
    print(json.dumps({"single": single, "ddp2": ddp, "max_relative_difference": diff}))
    assert diff < 1e-4, (single, ddp)


ENCODER_LAYER = "transformers.models.modernbert.modeling_modernbert.ModernBertEncoderLayer"
FSDP = {
    # FSDP2 (fully_shard, applied by DistillModule.configure_model): experiments/dewey_fsdp.yaml's strategy
    "fsdp2": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
              "init_args": {"save_distributed_checkpoint": False}},
    # FSDP1 (FullyShardedDataParallel): Lightning's FSDPStrategy with a CPU path, wrapped per encoder layer
    "fsdp1": {"class_path": "dewey_lab.distributed.FSDPStrategy",
              "init_args": {"auto_wrap_policy": [ENCODER_LAYER], "activation_checkpointing_policy": [ENCODER_LAYER],
                            "sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}},
}
# Largest relative weight difference from the 1-process run after the 8 steps. FSDP2 (as DDP): fp32
# rounding of another reduction order; measured 7.1e-6 (1.4e-6 after 4 steps). FSDP1: StableAdamW
# scales each tensor's step down by the RMS of grad^2 / v over the tensor when it exceeds 1, and FSDP1
# hands the optimizer flat shards, so a tensor cut across two ranks is scaled by each part's own RMS:
# measured 1.2e-4 after 8 steps, 2.6e-3 after 16 (the loss curves still agree to 2e-7). Bounds: 14x
# and 40x the measured 8-step figures.
WEIGHT_TOLERANCE = {"fsdp2": 1e-4, "fsdp1": 5e-3}


@pytest.mark.parametrize("kind", ["fsdp2", pytest.param("fsdp1", marks=pytest.mark.slow)])  # FSDP1: make test-slow
def test_two_process_fsdp_follows_the_single_process_loss(kind, single_process_run, two_process_run):
    """2-process FSDP on CPU (gloo): the 1-process loss curve, and one full last.ckpt written by rank 0
    through SafeCheckpointIO, with the 1-process parameter names and (FSDP2) weights."""
    from dewey_lab.runs.checkpoint import SafeCheckpointIO

    single, single_ckpt = single_process_run
    run, sharded = two_process_run(kind)
    assert sorted(single) == sorted(sharded) == list(range(STEPS))
    diff = _relative_difference(single, sharded)

    ckpt_dir = run / "runs" / "run" / "version_0" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=2-step=8.ckpt", "last.ckpt"]  # files: no shards,
    # no temporary left over
    io = SafeCheckpointIO()
    ours, theirs = io.load_checkpoint(ckpt_dir / "last.ckpt")["state_dict"], io.load_checkpoint(single_ckpt)["state_dict"]
    assert ours.keys() == theirs.keys()  # no FSDP prefixes: export and eval read it as a 1-process checkpoint
    weights = max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()) for k in theirs)
    print(json.dumps({"single": single, kind: sharded, "max_relative_loss_difference": diff,
                      "max_relative_weight_difference": weights}))
    assert diff < 1e-4, (single, sharded)
    assert weights < WEIGHT_TOLERANCE[kind]


def test_fsdp_experiment_stacks_on_the_multinode_one(capsys):
    """dewey.yaml + dewey_multinode.yaml + dewey_fsdp.yaml: FSDP2 replaces DDP, nothing of DDP's left."""
    from dewey_lab.cli import main

    files = [str(REPO / "experiments" / f"{name}.yaml") for name in ("dewey", "dewey_multinode", "dewey_fsdp")]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(a for f in files for a in ("-c", f)), "--print_config"])
    assert exit_info.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["strategy"]["class_path"] == FSDP["fsdp2"]["class_path"]
    assert trainer["strategy"]["init_args"]["save_distributed_checkpoint"] is False
    assert "find_unused_parameters" not in trainer["strategy"]["init_args"]
    assert trainer["num_nodes"] == 4 and trainer["use_distributed_sampler"] is False


@pytest.mark.fault
@pytest.mark.slow  # make test-slow: ~100 s each on 2 cores (three 2-process launches), beyond make test's budget
@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "fsdp1"])
def test_two_process_fit_killed_resumes_onto_the_uninterrupted_loss_curve(kind, two_process_run, small_corpus_path,
                                                                          shared_cache_dir, tmp_path):
    """2 processes, SIGKILLed mid-epoch (both ranks, between backward and the optimizer step), resumed
    with --ckpt_path last: the loss curve of the uninterrupted 2-process run, step for step."""
    _, straight = two_process_run(kind)
    config = _run_config(tmp_path / "killed", small_corpus_path, shared_cache_dir, 2, {"ddp": "ddp", **FSDP}[kind], **RUN)
    killable = write_yaml(tmp_path / "killed" / "killable.yaml", KILLABLE)  # on both runs: one identity
    out = run_fit(tmp_path / "killed", config, killable, kill="5:before_optimizer")
    assert out.returncode == -signal.SIGKILL, f"the kill did not happen: {out.stderr[-3000:]}"
    ckpt = tmp_path / "killed" / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    in_epoch = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"]
    assert (state["global_step"], state["epoch"], in_epoch) == (4, 1, 1)  # one batch into epoch 1
    out = run_fit(tmp_path / "killed", config, killable, resume=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resume: " in out.stderr
    resumed = loss_curve(tmp_path / "killed" / "runs")
    assert sorted(resumed) == sorted(straight)
    diff = _relative_difference(straight, resumed)
    print(json.dumps({"straight": straight, "resumed": resumed, "max_relative_loss_difference": diff}))
    assert diff <= 1e-6, [(s, straight[s], resumed[s]) for s in straight if straight[s] != resumed[s]]
    assert len(list((tmp_path / "killed" / "runs" / "run").glob("version_*"))) == 1  # one run, continued


def test_two_fill_jobs_share_one_cache_without_embedding_a_text_twice(small_corpus_path, tmp_path):
    """``dewey-lab fill --data.cache.fill_shard k/2`` twice at once: disjoint work, one consistent cache."""
    from faults import vectors_of

    from dewey_lab.data.store.vectors import cache_key

    cache_dir = tmp_path / "cache"
    procs = []
    for k in range(2):
        cfg = tmp_path / f"fill{k}.yaml"
        cfg.write_text(yaml.safe_dump({"data": {
            "corpus": {"class_path": "dewey_lab.data.corpus.JsonlCorpus", "init_args": {"path": str(small_corpus_path)}},
            "teacher": {"class_path": "faults.LoggingTeacher", "init_args": {"log": str(tmp_path / f"log{k}")}},
            "cache": {"dir": str(cache_dir), "fill_block": 32}, "windows": {"max_length": 96, "max_windows_per_doc": None}}}))
        procs.append(subprocess.Popen([sys.executable, "-m", "dewey_lab.cli", "fill", "-c", TINY, "-c", str(cfg),
                                       "--data.cache.fill_shard", f"{k}/2"], env=ENV, cwd=tmp_path,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    logs = [[bytes.fromhex(x).decode() for x in (tmp_path / f"log{k}").read_text().split()] for k in range(2)]
    assert logs[0] and logs[1] and not set(logs[0]) & set(logs[1])  # both worked, never on the same text
    texts = sorted(logs[0] + logs[1])
    assert len(texts) == len(set(texts))
    cache = VectorStore(cache_dir)
    keys = [cache_key("logging-12", t) for t in texts]
    assert cache.missing(keys) == [] and len(cache) == len(texts)
    assert cache.get_many(keys).tolist() == vectors_of(texts).tolist()
    assert verify(cache)["bad"] == 0
