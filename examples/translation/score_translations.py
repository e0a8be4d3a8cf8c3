"""Scores a fairseq-generate output file the two ways translation papers report BLEU.

1. Tokenized, compound-split BLEU (the newstest2014 figure of Vaswani et al. 2017, Ott et al. 2018 and RevCol
   Table 10): hypotheses and references stay Moses-tokenized, hyphenated compounds are split as
   ``a ##AT##-##AT## b``, and BLEU is computed on whitespace tokens (sacrebleu with ``tokenize="none"``, which is
   what multi-bleu.perl and fairseq-score compute).
2. Detokenized sacreBLEU with its signature (Post, 2018): the hypotheses are Moses-detokenized and compared with
   the raw reference text (``--raw-ref``), so the figure does not depend on anyone's tokenizer.

Writes ``{generate_output}.hyp`` and ``.ref`` (tokenized, in test-set order) next to the input and prints the
scores; with ``--json PATH`` also writes them as JSON.
"""
import argparse
import json
import os
import re
import sys

import sacrebleu
from sacremoses import MosesDetokenizer

from revcol.checkpoint import write_atomically

COMPOUND_HYPHEN = re.compile(r"(\S)-(\S)")


def read_lines(path: str):
    """The lines of a UTF-8 text file; a file that cannot be read stops the script with one line saying why."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except UnicodeDecodeError:
        sys.exit(f"error: {path} is not UTF-8 text")
    except OSError as e:
        sys.exit(f"error: cannot read {path}: {e.strerror}")


def write_lines(path: str, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def read_generate_output(path: str):
    """Returns (hypotheses, references) in test-set order from fairseq-generate's ``H-id`` and ``T-id`` lines."""
    hypotheses, references = {}, {}
    for line in read_lines(path):
        fields = line.split("\t")
        if line.startswith("H-"):
            hypotheses[int(fields[0][2:])] = fields[2] if len(fields) > 2 else ""
        elif line.startswith("T-"):
            references[int(fields[0][2:])] = fields[1] if len(fields) > 1 else ""
    if not hypotheses:
        sys.exit(f"error: {path} holds no fairseq-generate hypotheses (H- lines)")
    ids = sorted(hypotheses)
    if ids != list(range(len(ids))):
        missing = sorted(set(range(max(ids) + 1)) - set(ids))
        sys.exit(f"error: {path} lacks hypotheses for sentence ids {missing[:10]}: was generation cut short "
                 f"or run without --required-batch-size-multiple 1?")
    missing = [i for i in ids if i not in references]
    if missing:
        sys.exit(f"error: {path} lacks references (T- lines) for sentence ids {missing[:10]}")
    return [hypotheses[i] for i in ids], [references[i] for i in ids]


def split_compounds(line: str) -> str:
    """One non-overlapping pass, like the perl one-liner behind the published figures (so "a-b-c" becomes
    "a ##AT##-##AT## b-c"): a second pass would also split the "##AT##-##AT##" markers themselves."""
    return COMPOUND_HYPHEN.sub(r"\1 ##AT##-##AT## \2", line)


def tokenized_bleu(hypotheses, references) -> sacrebleu.BLEU:
    split_hyps = [split_compounds(h) for h in hypotheses]
    split_refs = [split_compounds(r) for r in references]
    return sacrebleu.corpus_bleu(split_hyps, [split_refs], tokenize="none", force=True)


def detokenized_sacrebleu(hypotheses, raw_references, lang: str):
    detokenizer = MosesDetokenizer(lang)
    detokenized = [detokenizer.detokenize(h.split()) for h in hypotheses]
    metric = sacrebleu.BLEU()
    return metric.corpus_score(detokenized, [raw_references]), metric.get_signature()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generate_output", help="stdout of fairseq-generate run with --remove-bpe")
    parser.add_argument("--raw-ref", help="raw (untokenized) reference text, one sentence per line, "
                                          "for detokenized sacreBLEU")
    parser.add_argument("--lang", default="en", help="target language for the Moses detokenizer")
    parser.add_argument("--json", help="also write the scores to this JSON file")
    args = parser.parse_args()
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        sys.exit(f"error: the folder of --json {args.json} does not exist")

    # Every input is read and checked before anything is written.
    hypotheses, references = read_generate_output(args.generate_output)
    raw_references = read_lines(args.raw_ref) if args.raw_ref else None
    if raw_references is not None and len(raw_references) != len(hypotheses):
        sys.exit(f"error: {args.raw_ref} has {len(raw_references)} lines but there are {len(hypotheses)} hypotheses")
    for suffix, lines in (("hyp", hypotheses), ("ref", references)):
        write_atomically(lambda tmp: write_lines(tmp, lines), f"{args.generate_output}.{suffix}")

    bleu = tokenized_bleu(hypotheses, references)
    scores = {"sentences": len(hypotheses), "tokenized_bleu": round(bleu.score, 2)}
    print(f"tokenized compound-split BLEU = {bleu.score:.2f} ({bleu})")
    if raw_references is not None:
        detok_bleu, signature = detokenized_sacrebleu(hypotheses, raw_references, args.lang)
        scores.update(sacrebleu=round(detok_bleu.score, 2), sacrebleu_signature=str(signature))
        print(f"detokenized sacreBLEU = {detok_bleu.score:.2f} ({detok_bleu}) signature: {signature}")
    if args.json:
        write_atomically(lambda tmp: write_json(tmp, scores), args.json)


if __name__ == "__main__":
    main()
