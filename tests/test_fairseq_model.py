"""RevCol-Transformer fairseq plugin: decoding, padding, reversible gradients, checkpoints, flags, CLI."""
import argparse
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils, metrics, options
from fairseq.data import Dictionary
from fairseq.data.data_utils import collate_tokens
from fairseq.models.transformer import TransformerEncoder
from fairseq.sequence_generator import SequenceGenerator
from helpers import rel_error, write_reversal_corpus

from revcol import check_gamma_init
from revcol.memory import count_saved_bytes
from revcol_fairseq import RevColTransformerModel
from revcol_fairseq.model import log_reconstruction_error

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "revcol_fairseq")
PAPER_PARAMS = 209e6  # Table 10, RevCol-Transformer on WMT'16 En-De


def model_args(arch, *flags):
    """Flags parsed exactly as fairseq-train parses them (the data directory is not read)."""
    return options.parse_args_and_arch(options.get_training_parser(), ["unused-data-dir", "--arch", arch, *flags])


def toy_dictionary(size=40):
    dictionary = Dictionary()
    for i in range(size - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    return dictionary


def build(*flags, arch="revcol_transformer_tiny", dictionary=None, seed=0):
    torch.manual_seed(seed)
    dictionary = dictionary or toy_dictionary()
    task = types.SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    return RevColTransformerModel.build_model(model_args(arch, *flags), task)


def source_batch(sentences, left_pad=True):
    """Token lists (EOS appended) -> padded (B, T) batch and lengths; fairseq left-pads sources by default."""
    tokens = [torch.tensor(s + [2]) for s in sentences]
    return collate_tokens(tokens, pad_idx=1, left_pad=left_pad), torch.tensor([len(t) for t in tokens])


SENTENCES = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def test_beam_search_scores_equal_teacher_forced_forward():
    model = build().eval()
    dictionary = model.decoder.dictionary
    src, lengths = source_batch(SENTENCES)
    generator = SequenceGenerator([model], dictionary, beam_size=3, max_len_a=0, max_len_b=8)
    with torch.no_grad():
        beams = generator.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})
        for i, beam in enumerate(beams):
            assert len(beam) == 3
            for hypo in beam:
                tokens = hypo["tokens"]
                prev = torch.cat([tokens.new_tensor([dictionary.eos()]), tokens[:-1]])
                unpadded = src[i, src[i].ne(1)]
                logits, _ = model(unpadded[None], lengths[i:i + 1], prev[None])
                lprobs = model.get_normalized_probs((logits, None), log_probs=True)[0]
                expected = lprobs.gather(-1, tokens[:, None]).squeeze(-1)
                torch.testing.assert_close(hypo["positional_scores"], expected, rtol=1e-5, atol=1e-5)


def test_reorder_encoder_out_equals_encoding_the_reordered_batch():
    model = build().eval()
    src, lengths = source_batch(SENTENCES)
    order = torch.tensor([2, 0, 0, 1])
    with torch.no_grad():
        reordered = model.encoder.reorder_encoder_out(model.encoder(src, lengths, return_all_hiddens=True), order)
        direct = model.encoder(src[order], lengths[order], return_all_hiddens=True)
    assert reordered.keys() == direct.keys()
    assert len(direct["encoder_states"]) == 2  # one per level of the last column
    assert direct["encoder_out"][0].shape == (src.shape[1], 4, 64)  # T x B x C
    for key in direct:
        assert len(reordered[key]) == len(direct[key])
        for got, want in zip(reordered[key], direct[key]):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("stem_flags", [[], ["--encoder-learned-pos", "--layernorm-embedding"]])
def test_padding_does_not_leak_into_encoder_or_decoder_outputs(stem_flags):
    # separate embeddings, so the encoder's pad row can be filled with garbage without touching the decoder
    model = build("--no-share-all-embeddings", *stem_flags).eval()
    sentence, prev = [5, 6, 7, 8], torch.tensor([[2, 9, 10, 11]])

    def outputs(src, lengths, row):
        encoder_out = model.encoder(src, lengths)
        logits, _ = model.decoder(prev.expand(len(src), -1), encoder_out=encoder_out)
        keep = src[row].ne(1)
        return encoder_out["encoder_out"][0][keep, row], logits[row]

    with torch.no_grad():
        alone = outputs(*source_batch([sentence]), row=0)
        left_padded = outputs(*source_batch([[3] * 9, sentence]), row=1)
        right_padded = outputs(*source_batch([[3] * 9, sentence], left_pad=False), row=1)
        model.encoder.embed_tokens.weight[1] = torch.randn(64) * 10
        garbage_pad = outputs(*source_batch([[3] * 9, sentence]), row=1)
    for padded in (left_padded, right_padded, garbage_pad):
        for got, want in zip(padded, alone):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reversible_and_plain_encoders_give_equal_gradients():
    # float64 so the inverse's rounding stays far below the tolerance; dropout and drop path on, so the
    # reversible recompute must replay their masks
    model = build("--revcol-columns", "3", "--revcol-drop-path", "0.2", "--dropout", "0.2").double().train()
    src, lengths = source_batch(SENTENCES)
    prev = torch.tensor([[2, 5, 6, 7, 8], [2, 9, 10, 11, 12], [2, 13, 14, 15, 16]])
    target = torch.roll(prev, -1, dims=1)

    def run(reversible):
        model.encoder.revcol.reversible = reversible
        model.zero_grad()
        torch.manual_seed(1)
        with count_saved_bytes() as saved:
            logits, _ = model(src, lengths, prev)
            lprobs = model.get_normalized_probs((logits, None), log_probs=True)
            loss = -lprobs.gather(-1, target[..., None]).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved

    loss_rev, grads_rev, saved_rev = run(reversible=True)
    loss_plain, grads_plain, saved_plain = run(reversible=False)
    torch.testing.assert_close(loss_rev, loss_plain, rtol=1e-12, atol=0)
    assert grads_rev.keys() == grads_plain.keys()
    assert any("gammas" in n for n in grads_rev) and any("embed_tokens" in n for n in grads_rev)
    for name in grads_plain:
        torch.testing.assert_close(grads_rev[name], grads_plain[name], rtol=1e-9, atol=1e-12, msg=name)
    assert saved_rev.bytes < saved_plain.bytes  # the reversible path ran: the columns kept no activations


def test_each_reversible_backward_logs_the_reconstruction_error_as_a_fairseq_metric():
    model = build("--revcol-columns", "3").train()
    src, lengths = source_batch(SENTENCES)
    prev = torch.tensor([[2, 5, 6, 7, 8], [2, 9, 10, 11, 12], [2, 13, 14, 15, 16]])
    logged = {}
    for reversible in (True, False):
        model.encoder.revcol.reversible = reversible
        with metrics.aggregate() as agg:
            for _ in range(2):
                model(src, lengths, prev)[0].sum().backward()
            logged[reversible] = agg.get_smoothed_values()
    assert "reconstruction_error" not in logged[False]  # plain autograd rebuilds nothing
    error = model.encoder.revcol.reconstruction_error.error
    assert 0.0 <= logged[True]["reconstruction_error"] < 1e-12 and error < 1e-12


def test_the_reconstruction_error_is_read_back_once_per_log_interval_and_warns_there(monkeypatch):
    # Each backward logs a device tensor (no host read); the model reads the gauge when fairseq reads its metrics.
    model = build("--revcol-columns", "3")
    model.log_interval = 2
    reads = []
    monkeypatch.setattr(model.encoder.revcol, "worst_reconstruction_error", lambda: reads.append(True))
    for num_updates in range(1, 6):
        model.set_num_updates(num_updates)
    assert len(reads) == 2  # at updates 2 and 4


@pytest.mark.slow
def test_a_nan_reconstruction_error_is_logged_as_nan():
    with metrics.aggregate() as agg:
        log_reconstruction_error(None, torch.tensor(math.nan))
        log_reconstruction_error(None, torch.tensor(1e-9))
    assert math.isnan(agg.get_smoothed_values()["reconstruction_error"])


def test_compiled_encoder_levels_give_the_plain_gradients():
    # --revcol-compile with dropout, drop path and padding: compiled levels must replay the same masks.
    flags = ("--revcol-columns", "3", "--revcol-drop-path", "0.2", "--dropout", "0.2", "--revcol-gamma-init", "1")
    compiled, eager = build(*flags, "--revcol-compile"), build(*flags)
    assert all(level._compiled_call_impl is not None for column in compiled.encoder.revcol.columns
               for level in column.levels)
    eager.encoder.revcol.reversible = False
    src, lengths = source_batch(SENTENCES)
    prev = torch.tensor([[2, 5, 6, 7, 8], [2, 9, 10, 11, 12], [2, 13, 14, 15, 16]])

    def grads(model):
        model.train().zero_grad()
        torch.manual_seed(1)
        logits, _ = model(src, lengths, prev)
        (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    got, want = grads(compiled), grads(eager)
    assert rel_error(got, want) < 1e-4


def test_half_precision_encoder_is_finite_and_reversible_grads_stay_close():
    model = build("--dropout", "0").half()
    src, lengths = source_batch(SENTENCES)
    prev = torch.tensor([[2, 5, 6], [2, 9, 10], [2, 13, 14]])

    def grads(reversible):
        model.encoder.revcol.reversible = reversible
        model.zero_grad()
        logits, _ = model(src, lengths, prev)
        assert logits.isfinite().all()
        logits.float().logsumexp(-1).sum().backward()
        return {n: p.grad.float() for n, p in model.encoder.named_parameters() if p.grad is not None}

    rev, plain = grads(True), grads(False)
    worst = max(rel_error(rev[n], plain[n]) for n in plain)
    assert worst < 0.05  # measured 0.5% at 2 columns, gamma 0.5: the inverse amplifies half-precision rounding


def test_architectures_fill_paper_defaults_and_flags_override_them():
    paper = model_args("revcol_transformer")
    assert (paper.revcol_columns, paper.revcol_blocks, paper.encoder_embed_dim, paper.encoder_ffn_embed_dim,
            paper.encoder_attention_heads) == (4, (1, 1, 1, 1), 768, 3072, 12)
    assert (paper.decoder_layers, paper.decoder_embed_dim, paper.decoder_ffn_embed_dim,
            paper.decoder_attention_heads) == (6, 768, 3072, 12)
    assert paper.share_all_embeddings and paper.revcol_reversible and paper.dropout == 0.3
    assert model_args("revcol_transformer_wmt_en_fr").dropout == 0.1
    custom = model_args("revcol_transformer", "--dropout", "0.2", "--revcol-columns", "8", "--revcol-blocks",
                        "2,2,2", "--no-revcol-reversible", "--no-share-all-embeddings", "--encoder-embed-dim", "512")
    assert (custom.dropout, custom.revcol_columns, custom.revcol_blocks) == (0.2, 8, (2, 2, 2))
    assert not custom.revcol_reversible and not custom.share_all_embeddings
    assert (custom.encoder_embed_dim, custom.decoder_embed_dim) == (512, 512)

    model = build("--revcol-columns", "3", "--revcol-blocks", "1,2,1", "--no-revcol-reversible")
    columns = model.encoder.revcol
    assert len(columns.columns) == 3 and [len(level.blocks) for level in columns.columns[0].levels] == [1, 2, 1]
    assert not columns.reversible


def test_encoder_flags_reach_their_modules():
    from fairseq.modules import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding

    from revcol.isotropic import DropPath

    def drop_paths(encoder):
        return [m.p for m in encoder.revcol.modules() if isinstance(m, DropPath)]

    def gammas(encoder):
        return [p for name, p in encoder.revcol.named_parameters() if "gammas" in name]

    default = build(seed=0).encoder
    assert gammas(default) and all(torch.all(g == 0.5) for g in gammas(default))
    assert drop_paths(default) == [] and isinstance(default.embed_positions, SinusoidalPositionalEmbedding)
    assert default.layernorm_embedding is None
    assert default.max_positions() == default.max_source_positions == 1024  # sinusoidal positions have no limit
    custom = build("--revcol-gamma-init", "0.8", "--revcol-drop-path", "0.2", "--attention-dropout", "0.15",
                   "--activation-dropout", "0.05", "--dropout", "0.25", "--encoder-learned-pos",
                   "--layernorm-embedding", "--max-source-positions", "64").encoder
    assert gammas(custom) and all(torch.all(g == 0.8) for g in gammas(custom))
    assert max(drop_paths(custom)) == pytest.approx(0.2)  # rising linearly over a column's blocks
    blocks = [block for column in custom.revcol.columns for level in column.levels for block in level.blocks]
    assert {block.attn.attn_dropout for block in blocks} == {0.15}
    assert {block.mlp.drop1.p for block in blocks} == {0.05} and {block.attn.proj_drop.p for block in blocks} == {0.25}
    assert isinstance(custom.embed_positions, LearnedPositionalEmbedding) and custom.layernorm_embedding is not None
    assert custom.max_positions() == 64
    negative = build("--revcol-gamma-init", "-0.5").encoder  # |gamma| bounds the inverse; either sign works
    assert gammas(negative) and all(torch.all(g == -0.5) for g in gammas(negative))


@pytest.mark.parametrize("stem_flags", [[], ["--no-scale-embedding"], ["--no-token-positional-embeddings"],
                                        ["--encoder-learned-pos", "--layernorm-embedding"]])
def test_source_embedding_and_encoder_out_fields_are_fairseqs_transformer_encoders(stem_flags):
    # The stem (scale, positions, LayerNorm, dropout) and the encoder_out fields besides encoder_out itself
    # are those of fairseq's own encoder, built here from the same flags and embeddings.
    flags = ["--dropout", "0.3", *stem_flags]
    model = build(*flags)
    reference = TransformerEncoder(model_args("revcol_transformer_tiny", *flags), model.encoder.dictionary,
                                   model.encoder.embed_tokens)
    reference.load_state_dict(model.encoder.state_dict(), strict=False)  # learned positions, LayerNorm
    src, lengths = source_batch(SENTENCES)
    for training in (False, True):
        stems = []
        for encoder in (model.encoder, reference):
            encoder.train(training)
            torch.manual_seed(0)
            stems.append(encoder.forward_embedding(src))
        (x, embed), (want_x, want_embed) = stems
        torch.testing.assert_close(x, want_x, rtol=0, atol=0)
        torch.testing.assert_close(embed, want_embed, rtol=0, atol=0)
    assert (x[src.ne(1)] == 0).float().mean() > 0.2  # dropout (0.3) fired in training
    model.eval()
    reference.eval()
    with torch.no_grad():
        got, want = model.encoder(src, lengths), reference(src, lengths)
    for key in ("encoder_embedding", "encoder_padding_mask", "src_lengths"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert got["src_lengths"][0].flatten().tolist() == [8, 3, 5]


def test_encoder_output_is_layer_normalized_and_zero_at_padding():
    # The isotropic columns end in a post-LN block, then the encoder's own LayerNorm (weight 1, bias 0 at init).
    model = build().eval()
    tokens, lengths = source_batch(SENTENCES)
    out = model.encoder(tokens, lengths)["encoder_out"][0]  # (T, B, C)
    real = ~tokens.eq(1).t()
    torch.testing.assert_close(out[real].mean(-1), torch.zeros(int(real.sum())), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[real].var(-1, unbiased=False), torch.ones(int(real.sum())), atol=1e-3, rtol=0)
    assert torch.all(out[~real] == 0)


def test_paper_configuration_matches_the_papers_parameter_count():
    model = build(arch="revcol_transformer", dictionary=toy_dictionary(32768))
    params = sum(p.numel() for p in model.parameters())
    print(f"revcol_transformer at a 32768-entry joint dictionary: {params:,} parameters")
    assert abs(params - PAPER_PARAMS) / PAPER_PARAMS < 0.01


@pytest.mark.parametrize("flags, message", [
    (["--revcol-blocks", "1,x"], "argument --revcol-blocks: --revcol-blocks must be comma-separated integers"),
    (["--revcol-blocks", "3"], "argument --revcol-blocks: --revcol-blocks needs at least 2 levels"),
    (["--revcol-blocks", "1,0"], "argument --revcol-blocks: --revcol-blocks needs at least 2 levels"),
    (["--revcol-columns", "0"], "argument --revcol-columns: must be an integer >= 1, got '0'"),
    (["--revcol-gamma-init", "0"], "argument --revcol-gamma-init: gamma_init 0.0 is out of range: it must be "
                                   "finite, with |gamma_init| >= 0.001 (the inverse divides by gamma"),
    (["--revcol-gamma-init", "nan"], "argument --revcol-gamma-init: gamma_init nan is out of range"),
    (["--revcol-gamma-init", "inf"], "argument --revcol-gamma-init: gamma_init inf is out of range"),
    (["--revcol-drop-path", "1.5"], "argument --revcol-drop-path: must be in [0, 1), got 1.5"),
    (["--revcol-drop-path", "1"], "argument --revcol-drop-path: must be in [0, 1), got 1"),
    (["--revcol-colums", "3"], "unrecognized arguments: --revcol-colums 3"),
])
def test_bad_revcol_flag_is_one_argparse_error(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        model_args("revcol_transformer_tiny", *flags)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in last_line and message in last_line


@pytest.mark.parametrize("flags, message", [
    (["--encoder-embed-dim", "66"], "--encoder-embed-dim 66 is not divisible by --encoder-attention-heads 4"),
    (["--decoder-attention-heads", "5"], "--decoder-embed-dim 64 is not divisible by --decoder-attention-heads 5"),
    (["--encoder-attention-heads", "0"], "--encoder-attention-heads must be at least 1, got 0"),
    (["--encoder-embed-dim", "28", "--encoder-ffn-embed-dim", "61"],
     "--encoder-ffn-embed-dim 61 is lost to rounding in the columns' MLP ratio 61/28"),
])
def test_dims_that_do_not_fit_the_heads_are_refused(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(*flags, "--no-share-all-embeddings")


@pytest.mark.parametrize("flags, message", [
    (["--encoder-embed-dim", "0", "--decoder-embed-dim", "0"], "^--encoder-embed-dim must be at least 1, got 0$"),
    (["--decoder-embed-dim", "0"], "^--decoder-embed-dim must be at least 1, got 0$"),
    (["--encoder-ffn-embed-dim", "0"], "^--encoder-ffn-embed-dim must be at least 1, got 0$"),
    (["--decoder-ffn-embed-dim", "0"], "^--decoder-ffn-embed-dim must be at least 1, got 0$"),
])
def test_zero_widths_are_refused_naming_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        build(*flags, "--no-share-all-embeddings")


@pytest.mark.parametrize("gamma_init, columns", [(1e6, 4), (-30.0, 8), (5e9, 2)])
def test_gamma_init_that_would_overflow_float32_is_the_cores_one_line_error(gamma_init, columns):
    with pytest.raises(ValueError) as core:
        check_gamma_init(gamma_init, columns)
    with pytest.raises(ValueError) as plugin:
        build("--revcol-gamma-init", str(gamma_init), "--revcol-columns", str(columns))
    assert str(plugin.value) == str(core.value)
    assert f"gamma_init {gamma_init!r} is out of range" in str(core.value) and "\n" not in str(core.value)


@pytest.mark.parametrize("name, value, message", [
    ("revcol_blocks", "1", "--revcol-blocks needs at least 2 levels"),
    ("revcol_blocks", (1, 0), "--revcol-blocks needs at least 2 levels of at least 1 block each, got '1,0'"),
    ("revcol_blocks", "1,x", "--revcol-blocks must be comma-separated integers such as 1,1,1,1, got '1,x'"),
    ("revcol_columns", 0, "--revcol-columns must be at least 1, got 0"),
    ("ddp_backend", "fully_sharded", "--ddp-backend fully_sharded is not supported by revcol_transformer"),
    ("revcol_gamma_init", float("nan"), "gamma_init nan is out of range"),
])
def test_namespaces_built_without_the_parser_are_checked_too(name, value, message):
    args = model_args("revcol_transformer_tiny")
    setattr(args, name, value)
    task = types.SimpleNamespace(source_dictionary=toy_dictionary(), target_dictionary=toy_dictionary())
    with pytest.raises(ValueError, match=message):
        RevColTransformerModel.build_model(args, task)


def test_blocks_given_as_text_build_as_the_flags_tuple():
    """Checkpoints written while --revcol-blocks was kept as text hold it so; they still build, the text parsed
    once at build into the tuple the flag now gives."""
    args = model_args("revcol_transformer_tiny", "--revcol-blocks", "1,2,1")
    assert args.revcol_blocks == (1, 2, 1)
    args.revcol_blocks = "1,2,1"
    task = types.SimpleNamespace(source_dictionary=toy_dictionary(), target_dictionary=toy_dictionary())
    model = RevColTransformerModel.build_model(args, task)
    assert args.revcol_blocks == (1, 2, 1)
    assert [len(level.blocks) for level in model.encoder.revcol.columns[0].levels] == [1, 2, 1]


class WritesMarker:
    """Pickles as a call of ``open(marker, "w")``: unpickling it with code allowed creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_with_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "payload_ran", tmp_path / "checkpoint_evil.pt"
    torch.save({"args": None, "cfg": None, "model": {}, "extra_state": WritesMarker(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: trusting the file runs it
    assert marker.exists()


# End to end through fairseq's command-line tools, on a tiny reversal task made here.

TRAIN_FLAGS = ["--user-dir", USER_DIR, "--arch", "revcol_transformer_tiny", "--task", "translation",
               "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4",
               "--max-tokens", "500", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
               "--seed", "1", "--num-workers", "0", "--log-interval", "1", "--log-format", "json",
               "--no-progress-bar", "--disable-validation", "--no-epoch-checkpoints"]


def fairseq_cli(tool, *args, cwd, expect_ok=True, **env_overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env_overrides)
    result = subprocess.run([sys.executable, "-m", f"fairseq_cli.{tool}", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    if expect_ok:
        assert result.returncode == 0, output[-4000:]
    return result.returncode, output


def logged_losses(output):
    """{update: loss} from fairseq-train's json train_inner lines."""
    losses = {}
    for line in output.splitlines():
        if "| train_inner |" in line:
            record = json.loads(line.split("| train_inner |", 1)[1])
            losses[int(record["num_updates"])] = float(record["loss"])
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Binarized toy data and a 6-update fairseq-train run: (workdir, data dir, checkpoint dir, logged losses)."""
    workdir = tmp_path_factory.mktemp("fairseq")
    write_reversal_corpus(workdir)
    fairseq_cli("preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", "train",
                "--validpref", "valid", "--destdir", "data-bin", "--joined-dictionary", "--workers", "1", cwd=workdir)
    # --save-interval-updates: fairseq writes checkpoint_<epoch>_3.pt and _6.pt, and copies them to checkpoint_last.pt
    _, output = fairseq_cli("train", "data-bin", *TRAIN_FLAGS, "--max-update", "6", "--save-dir", "uninterrupted",
                            "--save-interval-updates", "3", cwd=workdir)
    (workdir / "train.log").write_text(output)
    return workdir, workdir / "data-bin", workdir / "uninterrupted", logged_losses(output)


@pytest.mark.slow
def test_fairseq_train_logs_the_reconstruction_error(trained):
    workdir, _, _, _ = trained
    records = [json.loads(line.split("| train_inner |", 1)[1])
               for line in (workdir / "train.log").read_text().splitlines() if "| train_inner |" in line]
    assert len(records) == 6
    assert all(0.0 <= float(r["reconstruction_error"]) < 1e-12 for r in records), records


@pytest.mark.slow
def test_fairseq_train_copies_checkpoint_last_whole(trained):
    _, _, checkpoints, _ = trained
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_1_3.pt", "checkpoint_2_6.pt", "checkpoint_last.pt"]
    assert (checkpoints / "checkpoint_last.pt").read_bytes() == (checkpoints / "checkpoint_2_6.pt").read_bytes()


def test_checkpoint_copy_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    new, last = tmp_path / "checkpoint_1_4000.pt", tmp_path / "checkpoint_last.pt"
    new.write_bytes(b"new checkpoint " * 1000)
    last.write_bytes(b"old checkpoint")

    def copy_half_then_die(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", copy_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_utils.PathManager.copy(str(new), str(last), overwrite=True)
    assert last.read_bytes() == b"old checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1_4000.pt", "checkpoint_last.pt"]
    monkeypatch.undo()
    assert checkpoint_utils.PathManager.copy(str(new), str(last), overwrite=True)
    assert last.read_bytes() == new.read_bytes()


@pytest.mark.slow
def test_fairseq_train_checkpoint_holds_no_global_beyond_the_allowlist(trained):
    _, _, checkpoints, _ = trained
    path = checkpoints / "checkpoint_last.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []  # with the plugin's allowlist
    allowlist = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == ["argparse.Namespace"]
    finally:
        torch.serialization.add_safe_globals(allowlist)
    with torch.serialization.safe_globals([argparse.Namespace]):  # as timm's loader does: it removes them on exit
        pass
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoints / "checkpoint_last.pt"))
    assert state["cfg"].model.arch == "revcol_transformer_tiny"


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(trained):
    workdir, _, checkpoints, uninterrupted = trained
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    _, first_half = fairseq_cli("train", "data-bin", *TRAIN_FLAGS, "--max-update", "3", "--save-dir", "resumed",
                                cwd=workdir)
    _, second_half = fairseq_cli("train", "data-bin", *TRAIN_FLAGS, "--max-update", "6", "--save-dir", "resumed",
                                 cwd=workdir)
    assert "Loaded checkpoint resumed/checkpoint_last.pt (epoch 1 @ 3 updates)" in second_half
    assert {**logged_losses(first_half), **logged_losses(second_half)} == uninterrupted
    want = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoints / "checkpoint_last.pt"))["model"]
    got = checkpoint_utils.load_checkpoint_to_cpu(str(workdir / "resumed" / "checkpoint_last.pt"))["model"]
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def generate(trained, *flags, **env_overrides):
    """{sentence id: (hypothesis, score)} from fairseq-generate's H lines for the toy valid set (24 sentences),
    and fairseq-generate's whole output."""
    workdir, _, checkpoints, _ = trained
    _, output = fairseq_cli("generate", "data-bin", "--user-dir", USER_DIR, "--path",
                            str(checkpoints / "checkpoint_last.pt"), "--gen-subset", "valid", "--beam", "3",
                            "--batch-size", "8", *flags, cwd=workdir, **env_overrides)
    found = re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", output, flags=re.M)
    return {int(i): (text, float(score)) for i, score, text in found}, output


@pytest.fixture(scope="module")
def generated(trained):
    return generate(trained)[0]


@pytest.mark.slow
def test_fairseq_generate_with_user_dir_translates_every_sentence(generated):
    assert sorted(generated) == list(range(24))


@pytest.mark.slow
def test_fairseq_generate_with_compiled_levels_matches_eager(trained, generated):
    """A checkpoint trained with --revcol-compile generates with compiled encoder levels (eval mode, no grad,
    a new source length in each of the three batches); here the override turns that on for an eager checkpoint."""
    compiled, output = generate(trained, "--model-overrides", "{'revcol_compile': True}", TORCH_LOGS="dynamo")
    assert re.search(r"torchdynamo start tracing forward \S*revcol/isotropic.py", output), "levels must be compiled"
    assert "done compiler function inductor" in output
    assert sorted(compiled) == sorted(generated)
    for i, (text, score) in generated.items():
        assert compiled[i][0] == text
        assert compiled[i][1] == pytest.approx(score, abs=1e-5)


@pytest.mark.slow
def test_fairseq_generate_without_user_dir_fails_naming_the_checkpoint_global(trained):
    """Without the plugin nothing of ours runs: torch refuses the checkpoint's argparse.Namespace first
    (docs/fairseq.md says what this message means)."""
    workdir, _, checkpoints, _ = trained
    code, output = fairseq_cli("generate", "data-bin", "--path", str(checkpoints / "checkpoint_last.pt"),
                               "--gen-subset", "valid", cwd=workdir, expect_ok=False)
    assert code != 0
    assert "Unsupported global: GLOBAL argparse.Namespace" in output


@pytest.mark.slow
def test_hub_interface_translates_as_fairseq_generate_does(trained, generated):
    workdir, data, checkpoints, _ = trained
    hub = RevColTransformerModel.from_pretrained(str(checkpoints), checkpoint_file="checkpoint_last.pt",
                                                 data_name_or_path=str(data))
    assert isinstance(hub.models[0], RevColTransformerModel)
    sources = (workdir / "valid.src").read_text().splitlines()
    assert hub.translate(sources, beam=3) == [generated[i][0] for i in range(len(sources))]
    # After 6 updates most hypotheses are alike; their scores still depend on each source's encoding.
    best = [hypotheses[0] for hypotheses in hub.generate([hub.encode(s) for s in sources], beam=3)]
    scores = [hypothesis["score"].item() / math.log(2) for hypothesis in best]  # fairseq-generate prints base 2
    assert scores == pytest.approx([generated[i][1] for i in range(len(sources))], abs=1e-4)
    assert len(set(scores)) > len(sources) // 2
