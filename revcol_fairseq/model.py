"""RevCol-Transformer (paper Appendix B.2, Table 10): fairseq's Transformer with a RevCol encoder.

The decoder is fairseq's standard Transformer decoder; only the encoder changes. Registered through
fairseq's argparse route (``add_args`` + architecture functions), which is the route that honours flat
``--encoder-*`` flags for plugin models.
"""
import argparse
from typing import Sequence, Tuple, Union

from fairseq import metrics
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel, base_architecture
from torch import Tensor

from revcol import GAMMA_INIT, check_gamma_init

from .encoder import RevColEncoder


def parse_blocks(blocks: Union[str, Sequence[int]]) -> Tuple[int, ...]:
    """``"1,1,1,1"`` (the flag's text) or ``(1, 1, 1, 1)`` -> ``(1, 1, 1, 1)``: blocks per level, at least 2 levels
    of at least 1 block. The flag is parsed once, into a tuple; the text is still read from a namespace set by hand
    or from a checkpoint that holds it."""
    text = blocks if isinstance(blocks, str) else ",".join(map(str, blocks))
    try:
        parsed = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ValueError(f"--revcol-blocks must be comma-separated integers such as 1,1,1,1, got {text!r}") from None
    if len(parsed) < 2 or min(parsed) < 1:
        raise ValueError(f"--revcol-blocks needs at least 2 levels of at least 1 block each, got {text!r}")
    return parsed


def _blocks_flag(text: str) -> Tuple[int, ...]:
    """argparse type of --revcol-blocks: its blocks per level, or the one-line error."""
    try:
        return parse_blocks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _gamma(text: str) -> float:
    """argparse type: what :func:`check_gamma_init` can tell before the number of columns is known."""
    value = float(text)
    try:
        check_gamma_init(value, num_columns=1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def check_args(args) -> None:
    """Checks for namespaces built without our argparse types, and across flags; one ValueError naming them.
    ``--revcol-blocks`` becomes the tuple the flag gives, also where the namespace holds its text."""
    args.revcol_blocks = parse_blocks(args.revcol_blocks)
    if getattr(args, "ddp_backend", None) == "fully_sharded":
        # fairscale's FSDP gathers a module's parameters in its forward hooks, which the reversible backward's
        # recompute of the columns does not go through.
        raise ValueError("--ddp-backend fully_sharded is not supported by revcol_transformer: use --ddp-backend "
                         "pytorch_ddp (the default) or c10d")
    if args.revcol_columns < 1:
        raise ValueError(f"--revcol-columns must be at least 1, got {args.revcol_columns}")
    check_gamma_init(args.revcol_gamma_init, args.revcol_columns)
    for side in ("encoder", "decoder"):
        dim, heads = getattr(args, f"{side}_embed_dim"), getattr(args, f"{side}_attention_heads")
        for flag, value in (("embed-dim", dim), ("ffn-embed-dim", getattr(args, f"{side}_ffn_embed_dim"))):
            if value < 1:
                raise ValueError(f"--{side}-{flag} must be at least 1, got {value}")
        if heads < 1:
            raise ValueError(f"--{side}-attention-heads must be at least 1, got {heads}")
        if dim % heads != 0:
            raise ValueError(f"--{side}-embed-dim {dim} is not divisible by --{side}-attention-heads {heads}")
    dim, ffn = args.encoder_embed_dim, args.encoder_ffn_embed_dim
    if int(dim * (ffn / dim)) != ffn:
        raise ValueError(f"--encoder-ffn-embed-dim {ffn} is lost to rounding in the columns' MLP ratio "
                         f"{ffn}/{dim}; pick one that is, e.g. {4 * dim}")


@register_model("revcol_transformer")
class RevColTransformerModel(TransformerModel):
    """Transformer whose encoder is a RevCol (Appendix B.2). ``--encoder-layers``,
    ``--encoder-normalize-before`` and ``--encoder-layerdrop`` do not apply: the encoder's depth is
    ``--revcol-blocks`` per column times ``--revcol-columns``."""

    @classmethod
    def hub_models(cls):
        """No RevCol-Transformer checkpoints are published; without this, the Transformer's URLs would be offered."""
        return {}

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--revcol-columns", type=_positive_int, metavar="N", help="number of RevCol columns")
        parser.add_argument("--revcol-blocks", type=_blocks_flag, metavar="B1,B2,...",
                            help="transformer blocks per level, comma-separated (at least 2 levels)")
        parser.add_argument("--revcol-reversible", dest="revcol_reversible", action="store_true",
                            help="rebuild encoder activations in backward: memory flat in columns (default)")
        parser.add_argument("--no-revcol-reversible", dest="revcol_reversible", action="store_false",
                            help="store encoder activations (plain autograd)")
        parser.add_argument("--revcol-gamma-init", type=_gamma, metavar="G",
                            help="initial value of the reversible shortcut scale gamma")
        parser.add_argument("--revcol-drop-path", type=_probability, metavar="P",
                            help="stochastic depth rate, rising linearly over a column's blocks")
        parser.add_argument("--revcol-compile", action="store_true",
                            help="torch.compile each encoder level (the reversible backward stays eager)")
        parser.add_argument("--no-share-all-embeddings", dest="share_all_embeddings", action="store_false",
                            help="separate source, target and output embeddings (the default shares them)")

    @classmethod
    def build_model(cls, args, task):
        base_revcol_architecture(args)  # as fairseq's own build_model: a hand-made namespace gets the defaults
        check_args(args)
        model = super().build_model(args, task)
        if args.revcol_compile:
            model.encoder.revcol.compile_levels()
        model.encoder.revcol.register_reconstruction_hook(log_reconstruction_error)
        model.log_interval = getattr(args, "log_interval", 100)
        return model

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        if num_updates % self.log_interval == 0:
            # One device read per log interval, when fairseq reads its metrics too: it warns once if reversible
            # gradients drift from plain autograd's.
            self.encoder.revcol.worst_reconstruction_error()

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return RevColEncoder(
            src_dict, embed_tokens, depths=cfg.revcol_blocks, num_columns=cfg.revcol_columns,
            num_heads=cfg.encoder.attention_heads, ffn_dim=cfg.encoder.ffn_embed_dim,
            max_source_positions=cfg.max_source_positions, learned_pos=cfg.encoder.learned_pos,
            no_token_positional_embeddings=cfg.no_token_positional_embeddings,
            no_scale_embedding=cfg.no_scale_embedding, layernorm_embedding=cfg.layernorm_embedding,
            dropout=cfg.dropout, attn_dropout=cfg.attention_dropout,
            activation_dropout=cfg.activation_dropout, drop_path_rate=cfg.revcol_drop_path,
            gamma_init=cfg.revcol_gamma_init, reversible=cfg.revcol_reversible)


def log_reconstruction_error(columns, error: Tensor) -> None:
    """After each reversible backward: the worst rebuilt state's relative error, as a fairseq metric (averaged over
    the log interval, this rank's). Logged as the device tensor it is: fairseq reads it when it prints the log."""
    metrics.log_scalar("reconstruction_error", error, priority=900)


# Architectures: each only fills defaults, so every value can be overridden by its flag.


@register_model_architecture("revcol_transformer", "revcol_transformer")
def base_revcol_architecture(args):
    """Table 10: RevCol encoder B=(1,1,1,1), 4 columns, d 768 / ffn 3072 / 12 heads; 6-layer decoder of the
    same width; joint BPE with all embeddings shared; dropout 0.3 as Transformer-big on En-De (Ott et al.)."""
    args.revcol_columns = getattr(args, "revcol_columns", 4)
    args.revcol_blocks = getattr(args, "revcol_blocks", (1, 1, 1, 1))
    args.revcol_reversible = getattr(args, "revcol_reversible", True)
    args.revcol_gamma_init = getattr(args, "revcol_gamma_init", GAMMA_INIT)
    args.revcol_drop_path = getattr(args, "revcol_drop_path", 0.0)
    args.revcol_compile = getattr(args, "revcol_compile", False)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 768)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 3072)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 12)
    args.decoder_layers = getattr(args, "decoder_layers", 6)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", args.encoder_embed_dim)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", args.encoder_ffn_embed_dim)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", args.encoder_attention_heads)
    args.share_all_embeddings = getattr(args, "share_all_embeddings", True)
    args.dropout = getattr(args, "dropout", 0.3)
    base_architecture(args)


@register_model_architecture("revcol_transformer", "revcol_transformer_wmt_en_fr")
def revcol_transformer_wmt_en_fr(args):
    """Table 10 on WMT'14 En-Fr: dropout 0.1 as Transformer-big on En-Fr (Ott et al., 2018)."""
    args.dropout = getattr(args, "dropout", 0.1)
    base_revcol_architecture(args)


@register_model_architecture("revcol_transformer", "revcol_transformer_tiny")
def revcol_transformer_tiny(args):
    """For tests and CPU demos: 2 columns of 2 levels of 1 block, d 64; 2 decoder layers."""
    args.revcol_columns = getattr(args, "revcol_columns", 2)
    args.revcol_blocks = getattr(args, "revcol_blocks", (1, 1))
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.dropout = getattr(args, "dropout", 0.1)
    base_revcol_architecture(args)
