"""Prepares the WMT data of RevCol Table 10 as Ott et al. (2018) and fairseq's examples did, from local files.

Two datasets, one subcommand each:

``wmt16-en-de``: the Google-preprocessed WMT'16 En-De corpus of Ott et al. (2018) (4.5M sentence pairs, Moses
  tokenized, joint BPE 32K; newstest2013 valid, newstest2014 test). Only binarized here, with one joined
  dictionary capped at 32768 types.

``wmt14-en-fr``: WMT'14 En-Fr (36M sentence pairs) built from the raw corpora as fairseq's prepare-wmt14en2fr.sh
  does: Moses punctuation normalization and aggressive tokenization (sacremoses), every 1333rd pair held out as
  validation, joint BPE with 40K merges (subword-nmt; ``--subword sentencepiece`` trains a SentencePiece BPE
  model of that many pieces instead), train/valid pairs cleaned (1 to 250 tokens, length ratio at most 1.5), and
  newstest2014 from its SGML files as test.

Both end with ``fairseq-preprocess --joined-dictionary`` (one vocabulary for the shared embeddings) and copy the
untokenized newstest2014 reference to ``{dest}/test.raw.{tgt}`` for detokenized sacreBLEU. Nothing is downloaded:
when an input is missing the script names the archive to download and exits with status 1.
"""
import argparse
import functools
import gzip
import itertools
import multiprocessing
import os
import re
import shutil
import subprocess
import sys

from revcol.checkpoint import write_atomically

GOOGLE_WMT16_URL = "https://drive.google.com/uc?export=download&id=0B_bZck-ksdkpM25jRUN2X2UxMm8"
WMT14_EN_FR_TRAIN = {  # corpus path inside --raw-dir: the statmt.org archive that holds it
    "training/europarl-v7.fr-en": "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz",
    "commoncrawl.fr-en": "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz",
    "un/undoc.2000.fr-en": "http://statmt.org/wmt13/training-parallel-un.tgz",
    "training/news-commentary-v9.fr-en": "http://statmt.org/wmt14/training-parallel-nc-v9.tgz",
    "giga-fren.release2.fixed": "http://statmt.org/wmt10/training-giga-fren.tar",
}
WMT14_TEST_URL = "http://statmt.org/wmt14/test-full.tgz"
VALID_EVERY = 1333  # fairseq's prepare-wmt14en2fr.sh holds out every 1333rd training pair
MAX_TOKENS, MAX_RATIO = 250, 1.5  # Moses clean-corpus-n.perl settings of the fairseq WMT recipes
SGML_SEGMENT = re.compile(r"<seg id=\"?\d+\"?>\s*(.*?)\s*</seg>")


def resolve(path: str, url: str, raw_dir: str) -> str:
    """Returns ``path`` or its ``.gz`` twin; exits with one line naming what to download when neither exists."""
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    sys.exit(f"error: missing input file {path}: download {url} and extract it into {raw_dir}")


def read_lines(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            yield line.rstrip("\n")


def read_sgml_segments(path: str, straighten_apostrophes: bool):
    """The sentences of a WMT test-set .sgm file; fairseq straightens typographic apostrophes before tokenizing."""
    for line in read_lines(path):
        match = SGML_SEGMENT.search(line)
        if match:
            yield match.group(1).replace("\u2019", "'") if straighten_apostrophes else match.group(1)


def write_lines(path: str, lines) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    write_atomically(write, path)


def binarize(text_prefixes: dict, src: str, tgt: str, dest: str, workers: int, extra_args=()) -> None:
    """Runs fairseq-preprocess with one dictionary for both languages (needed by --share-all-embeddings)."""
    command = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", src, "--target-lang", tgt,
               "--trainpref", text_prefixes["train"], "--validpref", text_prefixes["valid"],
               "--testpref", text_prefixes["test"], "--destdir", dest, "--joined-dictionary",
               "--workers", str(workers), *extra_args]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def prepare_wmt16_en_de(args) -> None:
    """Binarizes the Google-preprocessed corpus (already tokenized, BPE-encoded and cleaned)."""
    hint = f"{GOOGLE_WMT16_URL} (wmt16_en_de.tar.gz)"
    prefixes = {"train": "train.tok.clean.bpe.32000", "valid": "newstest2013.tok.bpe.32000",
                "test": "newstest2014.tok.bpe.32000"}
    for prefix in prefixes.values():
        for lang in ("en", "de"):
            resolve(os.path.join(args.raw_dir, f"{prefix}.{lang}"), hint, args.raw_dir)
    raw_reference = resolve(os.path.join(args.raw_dir, "newstest2014.de"), hint, args.raw_dir)
    binarize({split: os.path.join(args.raw_dir, prefix) for split, prefix in prefixes.items()}, "en", "de",
             args.dest, args.workers, ("--nwordssrc", "32768", "--nwordstgt", "32768"))
    shutil.copyfile(raw_reference, os.path.join(args.dest, "test.raw.de"))


# Worker-process state for the parallel text passes (set by the pool initializers below).
_normalizer = _tokenizer = _subword = None


def _init_tokenizer(lang: str, normalize: bool) -> None:
    global _normalizer, _tokenizer
    from sacremoses import MosesPunctNormalizer, MosesTokenizer
    _normalizer = MosesPunctNormalizer(lang, post_remove_control_chars=True) if normalize else None
    _tokenizer = MosesTokenizer(lang)


def _tokenize(line: str) -> str:
    if _normalizer is not None:
        line = _normalizer.normalize(line)
    return _tokenizer.tokenize(line, aggressive_dash_splits=True, return_str=True)


def _init_subword(kind: str, model_path: str) -> None:
    global _subword
    if kind == "subword-nmt":
        from subword_nmt.apply_bpe import BPE
        with open(model_path, encoding="utf-8") as codes:
            _subword = BPE(codes).process_line
    else:
        import sentencepiece
        _subword = functools.partial(_encode_pieces, sentencepiece.SentencePieceProcessor(model_file=model_path))


def _encode_pieces(processor, line: str) -> str:
    return " ".join(processor.encode(line, out_type=str))


def _apply_subword(line: str) -> str:
    return _subword(line)


def parallel_map(function, lines, workers: int, initializer, initargs):
    """``map(function, lines)`` in order over ``workers`` processes, each set up by ``initializer(*initargs)``."""
    with multiprocessing.Pool(workers, initializer, initargs) as pool:
        yield from pool.imap(function, lines, chunksize=2000)


def learn_subword_model(kind: str, train_files, size: int, model_path: str, workers: int) -> None:
    print(f"learning a joint {kind} BPE model of size {size} on {' + '.join(train_files)}", flush=True)
    if kind == "subword-nmt":
        from subword_nmt.learn_bpe import learn_bpe
        # learn_bpe reads one file (by name, in chunks, when it runs in parallel): both sides concatenated.
        both_sides = model_path + ".input"
        write_lines(both_sides, (line for f in train_files for line in read_lines(f)))

        def write_codes(tmp):
            with open(both_sides, encoding="utf-8") as text, open(tmp, "w", encoding="utf-8") as codes:
                learn_bpe(text, codes, size, num_workers=workers)

        write_atomically(write_codes, model_path)
        os.remove(both_sides)
    else:
        import sentencepiece
        model_prefix = model_path[: -len(".model")]
        sentencepiece.SentencePieceTrainer.train(
            input=",".join(train_files), model_prefix=model_prefix, vocab_size=size, model_type="bpe",
            character_coverage=1.0, input_sentence_size=10_000_000, shuffle_input_sentence=True,
            num_threads=workers)


def keep_pair(src_line: str, tgt_line: str) -> bool:
    """Moses clean-corpus-n: both sides 1 to MAX_TOKENS tokens, neither more than MAX_RATIO times the other."""
    src_len, tgt_len = len(src_line.split()), len(tgt_line.split())
    if not (1 <= src_len <= MAX_TOKENS and 1 <= tgt_len <= MAX_TOKENS):
        return False
    return src_len <= MAX_RATIO * tgt_len and tgt_len <= MAX_RATIO * src_len


def prepare_wmt14_en_fr(args) -> None:
    src, tgt = "en", "fr"
    corpora = [(resolve(os.path.join(args.raw_dir, f"{corpus}.{src}"), url, args.raw_dir),
                resolve(os.path.join(args.raw_dir, f"{corpus}.{tgt}"), url, args.raw_dir))
               for corpus, url in WMT14_EN_FR_TRAIN.items()]
    test_sgml = {lang: resolve(os.path.join(args.raw_dir, "test-full", f"newstest2014-fren-{role}.{lang}.sgm"),
                               WMT14_TEST_URL, args.raw_dir)
                 for lang, role in ((src, "src"), (tgt, "ref"))}
    text = args.text_dir
    os.makedirs(text, exist_ok=True)

    for side, lang in enumerate((src, tgt)):
        print(f"tokenizing the {lang} training corpora", flush=True)
        tokenized = parallel_map(_tokenize, (line for pair in corpora for line in read_lines(pair[side])),
                                 args.workers, _init_tokenizer, (lang, True))
        with open(f"{text}/train.tok.{lang}.tmp", "w", encoding="utf-8") as train, \
                open(f"{text}/valid.tok.{lang}.tmp", "w", encoding="utf-8") as valid:
            for index, line in enumerate(tokenized, 1):
                (valid if index % VALID_EVERY == 0 else train).write(line + "\n")
        for split in ("train", "valid"):
            os.replace(f"{text}/{split}.tok.{lang}.tmp", f"{text}/{split}.tok.{lang}")
        # fairseq tokenizes the test set without punctuation normalization.
        write_lines(f"{text}/test.tok.{lang}", parallel_map(_tokenize, read_sgml_segments(test_sgml[lang], True),
                                                             args.workers, _init_tokenizer, (lang, False)))
    # The reference for detokenized sacreBLEU stays exactly as published.
    write_lines(f"{text}/test.raw.{tgt}", read_sgml_segments(test_sgml[tgt], False))

    model_path = f"{text}/bpe.codes" if args.subword == "subword-nmt" else f"{text}/spm.model"
    learn_subword_model(args.subword, [f"{text}/train.tok.{src}", f"{text}/train.tok.{tgt}"], args.bpe_tokens,
                        model_path, args.workers)
    for split in ("train", "valid", "test"):
        for lang in (src, tgt):
            print(f"applying {args.subword} to {split}.{lang}", flush=True)
            write_lines(f"{text}/{split}.bpe.{lang}", parallel_map(
                _apply_subword, read_lines(f"{text}/{split}.tok.{lang}"), args.workers,
                _init_subword, (args.subword, model_path)))

    for split in ("train", "valid"):
        pairs = itertools.zip_longest(read_lines(f"{text}/{split}.bpe.{src}"), read_lines(f"{text}/{split}.bpe.{tgt}"))
        kept = 0
        with open(f"{text}/{split}.clean.{src}.tmp", "w", encoding="utf-8") as src_out, \
                open(f"{text}/{split}.clean.{tgt}.tmp", "w", encoding="utf-8") as tgt_out:
            for src_line, tgt_line in pairs:
                if src_line is None or tgt_line is None:
                    sys.exit(f"error: {text}/{split}.bpe.{src} and .{tgt} differ in length: the {src} and {tgt} "
                             f"sides of a corpus in {args.raw_dir} do not have the same number of lines")
                if keep_pair(src_line, tgt_line):
                    src_out.write(src_line + "\n")
                    tgt_out.write(tgt_line + "\n")
                    kept += 1
        for lang in (src, tgt):
            os.replace(f"{text}/{split}.clean.{lang}.tmp", f"{text}/{split}.clean.{lang}")
        print(f"{split}: kept {kept} sentence pairs after cleaning", flush=True)
    for lang in (src, tgt):
        shutil.copyfile(f"{text}/test.bpe.{lang}", f"{text}/test.clean.{lang}")  # the test set is never filtered

    binarize({split: f"{text}/{split}.clean" for split in ("train", "valid", "test")}, src, tgt, args.dest,
             args.workers, ("--thresholdsrc", "0", "--thresholdtgt", "0"))
    shutil.copyfile(f"{text}/test.raw.{tgt}", os.path.join(args.dest, f"test.raw.{tgt}"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="dataset", required=True)
    en_de = subparsers.add_parser("wmt16-en-de", help="binarize the Google-preprocessed WMT'16 En-De corpus")
    en_de.add_argument("--raw-dir", required=True, help="where wmt16_en_de.tar.gz was extracted")
    en_fr = subparsers.add_parser("wmt14-en-fr", help="tokenize, BPE, clean and binarize WMT'14 En-Fr")
    en_fr.add_argument("--raw-dir", required=True, help="where the statmt.org archives were extracted")
    en_fr.add_argument("--text-dir", required=True, help="for the tokenized and BPE-encoded text files")
    en_fr.add_argument("--subword", choices=("subword-nmt", "sentencepiece"), default="subword-nmt")
    en_fr.add_argument("--bpe-tokens", type=int, default=40000, help="BPE merges (or SentencePiece pieces)")
    for subparser in (en_de, en_fr):
        subparser.add_argument("--dest", required=True, help="fairseq data-bin directory to write")
        subparser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.dataset == "wmt16-en-de":
        prepare_wmt16_en_de(args)
    else:
        prepare_wmt14_en_fr(args)
    print(f"done: binarized data in {args.dest}")


if __name__ == "__main__":
    main()
