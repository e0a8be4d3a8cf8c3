"""Multi-node launches on one machine: two "nodes" of one CPU process each, rendezvousing over loopback with gloo.

Each test starts the nodes as separate launcher processes, exactly as on two hosts, and checks the result against
one process that accumulates the same global batches.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_digits, write_reversal_corpus

from revcol_vit.train import parse_args, train

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # launches torchrun and fairseq-train processes

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_node(node_rank: int, port: int, *command: str, rendezvous: str = "static"):
    """The launch line of one node of two, one process per node, meeting at 127.0.0.1 (the first node's address).

    "static": node 0 hosts the store and the node ranks are fixed; "c10d": torchrun's elastic rendezvous, which
    numbers the nodes in the order they join.
    """
    meet = {"static": ["--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)],
            "c10d": ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test"]}
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            *meet[rendezvous], *command]


def run_all(commands, cwd: Path):
    """Runs the nodes' commands at the same time; returns each one's (exit status, output).

    Output goes to files, not pipes: a node blocked on a full pipe would stall the other in a collective. Each node
    runs in its own process group, so a timeout kills its launcher and every worker it started.
    """
    logs = [cwd / f"node{i}.log" for i in range(len(commands))]
    procs = []
    try:
        for command, log in zip(commands, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(command, cwd=cwd, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        codes = [proc.wait(timeout=TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


# --- RevCol-ViT trainer -------------------------------------------------------------------------------------------

VIT_FLAGS = ["--model", "revcol_vit_s", "--img-size", "32", "--patch-size", "8", "--embed-dim", "16",
             "--num-heads", "2", "--depths", "1", "1", "--num-columns", "2", "--workers", "0",
             "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "32", "--lr", "1e-4", "--lr-base-batch", "32",
             # every random augmentation off, so the two runs see identical images
             "--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0", "--scale", "1", "1",
             "--ratio", "1", "1", "--hflip", "0", "--drop-path-rate", "0", "--ema-decay", "0"]


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_vit_two_nodes_match_one_process_with_accumulation(tmp_path, rendezvous):
    """2 nodes x 1 rank x 16 images per step vs. 1 process accumulating 2 micro-batches of 16, over 2 epochs (the
    second one reshuffles the ranks' shards)."""
    data = write_digits(tmp_path / "digits", per_class=20)  # 160 training images: 5 steps of 32
    train_command = ["-m", "revcol_vit.train", "--data", str(data), "--output", str(tmp_path / "two_nodes"),
                     *VIT_FLAGS]
    port = free_port()
    nodes = run_all([torchrun_node(rank, port, *train_command, rendezvous=rendezvous) for rank in (0, 1)],
                    cwd=tmp_path)
    for code, output in nodes:
        assert code == 0, output[-3000:]
    assert sum("(2 ranks x 1 accumulation x 16)" in output for _, output in nodes) == 1  # logged by rank 0 only
    two_nodes = torch.load(tmp_path / "two_nodes" / "checkpoint.pth", weights_only=False)
    assert len(two_nodes["rng"]) == 2  # one RNG state gathered from each rank

    single = train(parse_args(["--data", str(data), "--output", str(tmp_path / "single"), *VIT_FLAGS,
                               "--accum-steps", "2"]))
    assert len(two_nodes["history"]) == len(single) == 2
    for row, single_row in zip(two_nodes["history"], single):
        assert row["step"] == single_row["step"] == 5 * row["epoch"]
        assert row["train_loss"] == pytest.approx(single_row["train_loss"], rel=1e-5)
        assert row["val_loss"] == pytest.approx(single_row["val_loss"], rel=1e-5)
    reference = torch.load(tmp_path / "single" / "checkpoint.pth", weights_only=False)["model"]
    for name, weight in two_nodes["model"].items():
        torch.testing.assert_close(weight, reference[name], rtol=0, atol=1e-5, msg=name)


# --- fairseq-train with the RevCol-Transformer plugin ---------------------------------------------------------------

# Dropout off: fairseq reseeds every update, so a rank's dropout masks differ from those of the same batch as the
# second accumulation micro-batch of one process.
FAIRSEQ_FLAGS = ["--user-dir", str(REPO / "revcol_fairseq"), "--arch", "revcol_transformer_tiny", "--dropout", "0",
                 "--task", "translation", "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt",
                 "--warmup-updates", "4", "--max-tokens", "500", "--criterion", "label_smoothed_cross_entropy",
                 "--label-smoothing", "0.1", "--seed", "1", "--num-workers", "0", "--log-interval", "1",
                 "--log-format", "json", "--no-progress-bar", "--disable-validation", "--no-epoch-checkpoints",
                 "--max-update", "3", "--cpu"]
# What works on CPU in fairseq 0.12 (docs/distributed.md says why): one process per node that is told its rank,
# gloo, and fairseq's own all-reduce (c10d's DDP is built with device_ids=[0], which a CPU model refuses).
FAIRSEQ_CPU_DISTRIBUTED = ["--distributed-world-size", "2", "--distributed-no-spawn",
                           "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]


def fairseq_train(*args: str):
    return [sys.executable, "-m", "fairseq_cli.train", "data-bin", *FAIRSEQ_FLAGS, *args]


def logged_losses(output: str):
    """{update: loss} from fairseq-train's json train_inner lines (rank 0 logs the loss over all ranks)."""
    losses = {}
    for line in output.splitlines():
        if "| train_inner |" in line:
            record = json.loads(line.split("| train_inner |", 1)[1])
            losses[int(record["num_updates"])] = record["loss"]
    return losses


def last_checkpoint(save_dir: Path):
    return torch.load(save_dir / "checkpoint_last.pt", weights_only=False)


@pytest.fixture(scope="module")
def fairseq_single(tmp_path_factory):
    """Binarized toy data and the reference: one process, 3 updates of 2 accumulated batches each."""
    workdir = tmp_path_factory.mktemp("fairseq")
    write_reversal_corpus(workdir)
    preprocess = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt",
                  "--trainpref", "train", "--validpref", "valid", "--destdir", "data-bin", "--joined-dictionary",
                  "--workers", "1"]
    [(code, output)] = run_all([preprocess], cwd=workdir)
    assert code == 0, output[-3000:]
    [(code, output)] = run_all([fairseq_train("--save-dir", "single", "--update-freq", "2")], cwd=workdir)
    assert code == 0, output[-3000:]
    return workdir, logged_losses(output), last_checkpoint(workdir / "single")


def assert_matches_single_process(nodes, save_dir: Path, fairseq_single):
    _, single_losses, single = fairseq_single
    for rank, (code, output) in enumerate(nodes):
        assert code == 0, output[-3000:]
        assert f"initialized host {socket.gethostname()} as rank {rank}" in output
    assert sorted(single_losses) == [1, 2, 3]
    assert logged_losses(nodes[0][1]) == single_losses  # printed to 3 decimals
    two_nodes = last_checkpoint(save_dir)
    assert two_nodes["cfg"]["distributed_training"]["distributed_world_size"] == 2
    assert two_nodes["model"].keys() == single["model"].keys()
    for name, weight in two_nodes["model"].items():
        torch.testing.assert_close(weight, single["model"][name], rtol=0, atol=1e-6, msg=name)


def test_fairseq_two_nodes_by_fairseq_flags_match_one_process_with_update_freq(fairseq_single):
    """fairseq's own multi-node launch: every node is given the rendezvous address and its rank."""
    workdir = fairseq_single[0]
    init = f"tcp://127.0.0.1:{free_port()}"
    nodes = run_all([fairseq_train("--save-dir", "tcp", *FAIRSEQ_CPU_DISTRIBUTED, "--distributed-init-method", init,
                                   "--distributed-rank", str(rank)) for rank in (0, 1)], cwd=workdir)
    assert_matches_single_process(nodes, workdir / "tcp", fairseq_single)


def test_fairseq_two_nodes_by_torchrun_match_one_process_with_update_freq(fairseq_single):
    """torchrun on each node. fairseq's own reading of torchrun's environment divides by the CUDA device count, so
    on CPU an explicit env:// skips it and a shell passes torchrun's RANK on as --distributed-rank."""
    workdir = fairseq_single[0]
    with_rank = ["--no-python", "bash", "-c", 'exec "$@" --distributed-rank "$RANK"', "fairseq-train"]
    command = [*with_rank, *fairseq_train("--save-dir", "torchrun", *FAIRSEQ_CPU_DISTRIBUTED,
                                          "--distributed-init-method", "env://")]
    port = free_port()
    nodes = run_all([torchrun_node(rank, port, *command) for rank in (0, 1)], cwd=workdir)
    assert_matches_single_process(nodes, workdir / "torchrun", fairseq_single)
