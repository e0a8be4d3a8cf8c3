"""End to end translation through the real command-line tools: the demo script trains a tiny RevCol-Transformer on
the synthetic corpus once (module fixture); the tests then check its BLEU, checkpoint averaging, fairseq-interactive,
fairseq-validate, the WMT data preparation on miniature corpora laid out like the real downloads, and the batch
arithmetic of the WMT training recipe."""
import json
import math
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest
import sacrebleu
import torch

pytestmark = pytest.mark.slow  # runs the demo, fairseq CLIs and scripts as processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSLATION = os.path.join(REPO, "examples", "translation")  # the demo and the WMT tools
VENV_BIN = os.path.dirname(sys.executable)
DEMO_UPDATES = 400
# Measured at 400 updates: 74 BLEU (seed 1). Copying the source scores 0.0 (the languages share only the
# indefinite article), and a model that ignores its input cannot pick the nouns and verbs of a given sentence.
BLEU_FLOOR = 40.0


def run(command, stdin_text=None, **env_overrides):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHON=sys.executable, **env_overrides)
    return subprocess.run(command, cwd=REPO, env=env, input=stdin_text, capture_output=True, text=True)


def check(command, stdin_text=None, **env_overrides):
    result = run(command, stdin_text, **env_overrides)
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Runs examples/translation/run_demo.sh (corpus, BPE, preprocess, train, generate, score)."""
    work = tmp_path_factory.mktemp("translation_demo")
    result = check(["bash", "examples/translation/run_demo.sh", str(work)], MAX_UPDATE=str(DEMO_UPDATES))
    return work, result.stdout


def read_json_log(path):
    """fairseq's --log-format json lines: the JSON object after the logger prefix of each line."""
    records = []
    with open(path) as f:
        for line in f:
            if '{"' in line:  # the metric lines; others print Python dicts (the config)
                records.append(json.loads(line[line.index('{"'):]))
    return records


def test_demo_trains_to_bleu_floor(demo):
    work, stdout = demo
    scores = json.load(open(work / "checkpoints" / "bleu.json"))
    assert scores["sentences"] == 300  # every test sentence translated, none dropped by batching
    assert scores["tokenized_bleu"] > BLEU_FLOOR, stdout[-2000:]
    assert "tokenized compound-split BLEU" in stdout and "signature: nrefs:1" in stdout

    valid = [r for r in read_json_log(work / "train.log") if "valid_loss" in r]
    assert float(valid[-1]["valid_loss"]) < 0.5 * float(valid[0]["valid_loss"])
    assert max(int(r["valid_num_updates"]) for r in valid) == DEMO_UPDATES
    assert "@@" not in open(work / "checkpoints" / "generate-test.txt.hyp").read()


def test_average_checkpoints_writes_the_mean_and_it_loads(demo, tmp_path):
    from fairseq import checkpoint_utils

    import revcol_fairseq

    work, _ = demo
    averaged_path = tmp_path / "averaged.pt"
    check([sys.executable, "examples/translation/average_checkpoints.py", str(work / "checkpoints"), "--last", "3",
           "--output", str(averaged_path)])

    def updates(path):
        return int(path.stem.split("_")[-1])

    inputs = sorted((work / "checkpoints").glob("checkpoint_*_*.pt"), key=updates)
    assert [updates(p) for p in inputs] == [200, 300, 400]  # the demo keeps the last 3, 100 updates apart
    revcol_fairseq.allow_fairseq_checkpoint_globals()  # another test's timm load may have removed them
    weights = [torch.load(p, map_location="cpu", weights_only=True)["model"] for p in inputs]
    averaged = torch.load(averaged_path, map_location="cpu", weights_only=True)["model"]
    assert averaged.keys() == weights[0].keys()
    for name in ("encoder.embed_tokens.weight", "decoder.layers.0.fc1.weight"):
        expected = sum(w[name].double() for w in weights) / 3
        torch.testing.assert_close(averaged[name].double(), expected, rtol=0, atol=1e-6)
    assert not torch.equal(averaged["decoder.layers.0.fc1.weight"], weights[-1]["decoder.layers.0.fc1.weight"])
    assert not list(tmp_path.glob("*.tmp"))

    models, _ = checkpoint_utils.load_model_ensemble([str(averaged_path)])
    assert isinstance(models[0], revcol_fairseq.RevColTransformerModel)


def average_checkpoints_cli(monkeypatch, *argv):
    """Runs examples/translation/average_checkpoints.py in this process, where fairseq is already imported."""
    monkeypatch.setattr(sys, "argv", ["average_checkpoints.py", *argv])
    runpy.run_path(os.path.join(TRANSLATION, "average_checkpoints.py"), run_name="__main__")


def write_numbered_checkpoints(folder, weights_by_updates):
    """checkpoint_1_<updates>.pt files holding the given weights, and their update count where fairseq keeps it."""
    folder.mkdir()
    for updates, weights in weights_by_updates.items():
        torch.save({"model": weights, "optimizer_history": [{"num_updates": updates}],
                    "extra_state": {"train_iterator": {"iterations_in_epoch": updates}}},
                   folder / f"checkpoint_1_{updates}.pt")
    return folder


def test_average_checkpoints_picks_the_highest_update_counts(tmp_path):
    # By name, checkpoint_1_900.pt sorts after checkpoint_1_1000.pt: the update count must decide. A temporary
    # file left by a killed save is no checkpoint.
    for name in ["checkpoint_1_900.pt", "checkpoint_2_1000.pt", "checkpoint_2_1100.pt", "checkpoint_1_95.pt",
                 "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_2_1200.pt.tmp"]:
        (tmp_path / name).touch()
    script = runpy.run_path(os.path.join(TRANSLATION, "average_checkpoints.py"))
    assert [os.path.basename(p) for p in script["last_checkpoints"](str(tmp_path), 3)] == \
        ["checkpoint_1_900.pt", "checkpoint_2_1000.pt", "checkpoint_2_1100.pt"]


def test_average_checkpoints_killed_while_writing_keeps_the_previous_output(demo, tmp_path, monkeypatch):
    work, _ = demo
    output = tmp_path / "averaged.pt"
    output.write_bytes(b"an earlier average")
    save = torch.save

    def save_halfway_then_die(state, path):
        save(state, path)
        os.truncate(path, os.path.getsize(path) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_halfway_then_die)
    with pytest.raises(KeyboardInterrupt):
        average_checkpoints_cli(monkeypatch, str(work / "checkpoints"), "--last", "3", "--output", str(output))
    assert output.read_bytes() == b"an earlier average"
    assert os.listdir(tmp_path) == ["averaged.pt"]


def test_average_checkpoints_keeps_each_weights_dtype_and_the_newest_training_state(tmp_path, monkeypatch):
    checkpoints = write_numbered_checkpoints(tmp_path / "checkpoints", {
        100: {"half": torch.tensor([9.0, 9.0], dtype=torch.float16), "single": torch.tensor([9.0])},
        200: {"half": torch.tensor([2.0, 2.0], dtype=torch.float16), "single": torch.tensor([1.0])},
        300: {"half": torch.tensor([4.0, 5.0], dtype=torch.float16), "single": torch.tensor([6.0])},
    })
    output = tmp_path / "averaged.pt"
    average_checkpoints_cli(monkeypatch, str(checkpoints), "--last", "2", "--output", str(output))
    averaged = torch.load(output, map_location="cpu", weights_only=True)
    assert averaged["model"]["half"].dtype == torch.float16 and averaged["model"]["single"].dtype == torch.float32
    assert averaged["model"]["half"].tolist() == [3.0, 3.5] and averaged["model"]["single"].tolist() == [3.5]
    assert averaged["optimizer_history"] == [{"num_updates": 300}]  # fairseq resumes and logs from these
    assert averaged["extra_state"] == {"train_iterator": {"iterations_in_epoch": 300}}


@pytest.mark.parametrize("case, message", [
    ("--last 0", "--last must be at least 1, got 0"),
    ("output in a missing folder", "the folder of --output {tmp}/no/averaged.pt does not exist"),
    ("different models", "{checkpoints}/checkpoint_1_200.pt has different weight names than "
                         "{checkpoints}/checkpoint_1_100.pt: not the same model"),
])
def test_average_checkpoints_bad_input_is_one_error_and_writes_nothing(tmp_path, monkeypatch, case, message):
    newer = {"w": torch.ones(2), "extra.w": torch.ones(2)} if case == "different models" else {"w": torch.ones(2)}
    checkpoints = write_numbered_checkpoints(tmp_path / "checkpoints", {100: {"w": torch.zeros(2)}, 200: newer})
    output = tmp_path / "no" / "averaged.pt" if case == "output in a missing folder" else tmp_path / "averaged.pt"
    with pytest.raises(SystemExit) as exit_info:
        average_checkpoints_cli(monkeypatch, str(checkpoints), "--last", "0" if case == "--last 0" else "2",
                                "--output", str(output))
    assert str(exit_info.value) == "error: " + message.format(tmp=tmp_path, checkpoints=checkpoints)
    assert os.listdir(tmp_path) == ["checkpoints"]


def test_average_checkpoints_names_a_damaged_checkpoint_and_writes_nothing(demo, tmp_path):
    work, _ = demo
    damaged = tmp_path / "checkpoints"
    damaged.mkdir()
    inputs = sorted((work / "checkpoints").glob("checkpoint_*_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))
    for path in inputs:
        (damaged / path.name).write_bytes(path.read_bytes())
    newest = damaged / inputs[-1].name
    newest.write_bytes(newest.read_bytes()[:100_000])  # cut off, as by a full disk
    result = run([sys.executable, "examples/translation/average_checkpoints.py", str(damaged), "--last", "3",
                  "--output", str(tmp_path / "averaged.pt")])
    assert result.returncode == 1 and "Traceback" not in result.stderr  # (importing fairseq warns on stderr first)
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: checkpoint {newest} cannot be read: truncated, or not a torch checkpoint (RuntimeError)"
    assert not list(tmp_path.glob("averaged.pt*"))


def test_evaluation_that_fails_keeps_the_earlier_output(demo, tmp_path):
    work, _ = demo
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(work / "checkpoints", checkpoints)
    before = (checkpoints / "generate-test.txt").read_bytes()
    result = run(["bash", "examples/translation/evaluate_translation.sh", str(work / "data-bin"), str(checkpoints),
                  "--cpu", "--no-such-flag"], LAST="1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: fairseq-generate failed (above); {checkpoints}/generate-test.txt is unchanged"
    assert (checkpoints / "generate-test.txt").read_bytes() == before
    assert not list(checkpoints.glob("*.tmp"))


def test_evaluation_generates_with_beam_4_and_lenpen_0_6(demo):
    # The demo's last step ran examples/translation/evaluate_translation.sh. fairseq-generate names its beam in the
    # summary line, and each hypothesis score (H-) is the sum of its token log-probabilities (P-, EOS included) divided
    # by length ** lenpen, so the lenpen it ran with can be read back: log(sum / score) / log(length). Without the flags
    # fairseq would search with its defaults, beam 5 and lenpen 1 (the plain mean).
    work, _ = demo
    scores, positional = {}, {}
    with open(work / "checkpoints" / "generate-test.txt") as f:
        lines = f.read().splitlines()
    for fields in (line.split("\t") for line in lines):
        if fields[0].startswith("H-"):
            scores[fields[0][2:]] = float(fields[1])
        elif fields[0].startswith("P-"):
            positional[fields[0][2:]] = [float(p) for p in fields[1].split()]
    assert lines[-1].startswith("Generate test with beam=4: BLEU4 = ")
    assert len(scores) == len(positional) == 300
    lenpens = [math.log(sum(positional[i]) / scores[i]) / math.log(len(positional[i])) for i in scores]
    assert min(lenpens) == pytest.approx(0.6, abs=2e-3) and max(lenpens) == pytest.approx(0.6, abs=2e-3)


def test_interactive_translates_like_generate(demo):
    work, _ = demo
    with open(work / "raw" / "test.src") as f:
        source = f.readline().strip()
    result = check([os.path.join(VENV_BIN, "fairseq-interactive"), str(work / "data-bin"), "--cpu",
                    "--user-dir", "revcol_fairseq", "--path", str(work / "checkpoints" / "averaged_last1.pt"),
                    "--beam", "4", "--lenpen", "0.6", "--bpe", "subword_nmt",
                    "--bpe-codes", str(work / "bpe" / "codes")], stdin_text=source + "\n")
    hypotheses = [line.split("\t")[2] for line in result.stdout.splitlines() if line.startswith("D-")]
    with open(work / "checkpoints" / "generate-test.txt.hyp") as f:
        assert hypotheses == [f.readline().strip()]


def test_validate_reports_low_loss(demo):
    work, _ = demo
    result = check([os.path.join(VENV_BIN, "fairseq-validate"), str(work / "data-bin"), "--cpu",
                    "--task", "translation", "--user-dir", "revcol_fairseq",
                    "--path", str(work / "checkpoints" / "averaged_last1.pt"), "--valid-subset", "valid",
                    "--max-tokens", "4000", "--required-batch-size-multiple", "1"])
    nll_loss = float(re.search(r"nll_loss ([\d.]+)", result.stdout + result.stderr).group(1))
    assert nll_loss < 1.0  # in bits per token; an untrained model starts near log2(240 types) = 7.9


def test_score_translations_orders_splits_compounds_and_rejects_gaps(tmp_path, monkeypatch):
    generate_output = tmp_path / "generate-test.txt"
    sentences = {1: "das ist ein well-known Wort-für-Wort Test", 0: "ein kleiner Satz ."}
    generate_output.write_text("".join(f"S-{i}\tsrc\nT-{i}\t{s}\nH-{i}\t-0.1\t{s}\n" for i, s in sentences.items()))
    result = check([sys.executable, "examples/translation/score_translations.py", str(generate_output)])
    assert "BLEU = 100.00" in result.stdout
    assert (tmp_path / "generate-test.txt.hyp").read_text().splitlines() == [sentences[0], sentences[1]]
    monkeypatch.syspath_prepend(TRANSLATION)
    from score_translations import split_compounds
    # One non-overlapping pass, as the perl one-liner behind the published figures: in "a-b-c" the "b" is
    # consumed by the first match, so the second hyphen stays.
    assert split_compounds("Wort-für-Wort a-b-c") == "Wort ##AT##-##AT## für ##AT##-##AT## Wort a ##AT##-##AT## b-c"

    generate_output.write_text("H-0\t-0.1\tein Satz\nH-2\t-0.1\tnoch einer\n")
    result = run([sys.executable, "examples/translation/score_translations.py", str(generate_output)])
    assert result.returncode != 0 and "lacks hypotheses for sentence ids [1]" in result.stderr


def test_tokenized_bleu_counts_the_split_compound_pieces(tmp_path):
    # "well-known" against "well-made": split, 4 of 5 words match ("well ##AT##-##AT## known"), 3 of 4 bigrams, 2 of 3
    # trigrams, 1 of 2 4-grams: BLEU = 100 (0.8 x 0.75 x 2/3 x 0.5) ^ (1/4) = 66.87. Unsplit it would be 0 (no 4-gram
    # in 3 words), and sacreBLEU's own tokenizer would cut the markers into more pieces.
    generate_output = tmp_path / "generate-test.txt"
    generate_output.write_text("S-0\tsrc\nT-0\tdas ist well-made\nH-0\t-0.1\tdas ist well-known\n")
    result = check([sys.executable, "examples/translation/score_translations.py", str(generate_output)])
    assert result.stdout.startswith("tokenized compound-split BLEU = 66.87 (BLEU = 66.87 80.0/75.0/66.7/50.0 ")


def test_sacrebleu_scores_the_detokenized_hypotheses_against_the_raw_reference(tmp_path):
    # fairseq-generate's hypotheses are Moses-tokenized (XML-escaped quotes, "@-@" hyphens, split punctuation);
    # sacreBLEU must see them as plain text, as the raw reference is. Scored as they stand they would get 32.11,
    # and 64.76 detokenized but still escaped (sacreBLEU's 13a tokenizer unescapes &quot; but not &apos;).
    tokenized = ["Der &quot; well @-@ known &quot; Test , oder ?", "Das Kind spielt im Garten .",
                 "Die 3 @-@ Zimmer @-@ Wohnung kostet 1.200 Euro ( warm ) .", "Sie sagte : &apos; Nein ! &apos;"]
    detokenized = ['Der "well-known" Test, oder?', "Das Kind spielt im Garten.",
                   "Die 3-Zimmer-Wohnung kostet 1.200 Euro (warm).", "Sie sagte: 'Nein!'"]
    raw_references = ['Der "well-known" Test, oder?', "Das Kind schläft im Garten.",
                      "Die 3-Zimmer-Wohnung kostet 1.200 Euro (warm).", "Sie sagte: 'Nein!'"]
    expected = sacrebleu.corpus_bleu(detokenized, [raw_references]).score
    assert round(expected, 2) == 90.0 and round(sacrebleu.corpus_bleu(tokenized, [raw_references]).score, 2) == 32.11
    generate_output, raw = tmp_path / "generate-test.txt", tmp_path / "test.raw.de"
    generate_output.write_text("".join(f"S-{i}\tsrc\nT-{i}\t{h}\nH-{i}\t-0.1\t{h}\n" for i, h in enumerate(tokenized)),
                               encoding="utf-8")
    raw.write_text("".join(r + "\n" for r in raw_references), encoding="utf-8")
    result = check([sys.executable, "examples/translation/score_translations.py", str(generate_output),
                    "--raw-ref", str(raw), "--lang", "de", "--json", str(tmp_path / "bleu.json")])
    assert f"detokenized sacreBLEU = {expected:.2f} (BLEU = {expected:.2f} " in result.stdout
    assert json.load(open(tmp_path / "bleu.json"))["sacrebleu"] == round(expected, 2) == 90.0


@pytest.mark.parametrize("case, message", [
    ("no references", "{output} lacks references (T- lines) for sentence ids [0, 1]"),  # not BLEU 0 against ""
    ("missing output", "cannot read {output}: No such file or directory"),
    ("not UTF-8", "{output} is not UTF-8 text"),
    ("short raw reference", "{raw} has 1 lines but there are 2 hypotheses"),
    ("missing raw reference", "cannot read {raw}: No such file or directory"),
    ("json in a missing folder", "the folder of --json {tmp}/no/bleu.json does not exist"),
])
def test_score_translations_bad_input_is_one_line_and_writes_nothing(tmp_path, case, message):
    output, raw = tmp_path / "generate-test.txt", tmp_path / "test.raw.de"
    lines = "S-0\tsrc\nT-0\tein Satz .\nH-0\t-0.1\tein Satz .\nS-1\tsrc\nT-1\tnoch einer\nH-1\t-0.2\tnoch einer\n"
    if case == "no references":
        lines = "".join(line + "\n" for line in lines.splitlines() if not line.startswith("T-"))
    if case != "missing output":
        output.write_bytes(b"H-0\t-0.1\t\xff\n" if case == "not UTF-8" else lines.encode())
    raw.write_text("ein Satz.\n" if case == "short raw reference" else "ein Satz.\nnoch einer\n")
    if case == "missing raw reference":
        raw.unlink()
    json_path = tmp_path / "no" / "bleu.json" if case == "json in a missing folder" else tmp_path / "bleu.json"
    result = run([sys.executable, "examples/translation/score_translations.py", str(output), "--raw-ref", str(raw),
                  "--lang", "de", "--json", str(json_path)])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: " + message.format(output=output, raw=raw, tmp=tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (output, raw) if p.exists())  # no .hyp, .ref or JSON written


# WMT data preparation, on miniature corpora laid out like the extracted downloads.


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_sgml(path, segments):
    write_lines(path, ['<srcset setid="newstest2014">', '<doc docid="toy">',
                       *(f'<seg id="{i}">{s}</seg>' for i, s in enumerate(segments, 1)), "</doc>", "</srcset>"])


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("toy_corpus")
    check([sys.executable, "examples/translation/make_toy_corpus.py", str(corpus), "--train-size", "2700",
           "--valid-size", "10", "--test-size", "10"])
    read = lambda name: (corpus / name).read_text(encoding="utf-8").splitlines()  # noqa: E731
    return list(zip(read("train.src"), read("train.tgt"))), list(zip(read("test.src"), read("test.tgt")))


def write_wmt14_en_fr_layout(raw, pairs, test_pairs):
    """The files of the extracted WMT'14 En-Fr archives, with ``pairs`` spread over the five training corpora."""
    for i, corpus in enumerate(["training/europarl-v7.fr-en", "commoncrawl.fr-en", "un/undoc.2000.fr-en",
                                "training/news-commentary-v9.fr-en", "giga-fren.release2.fixed"]):
        share = pairs[i * len(pairs) // 5:(i + 1) * len(pairs) // 5]
        write_lines(raw / f"{corpus}.en", [en for en, _ in share])
        write_lines(raw / f"{corpus}.fr", [fr for _, fr in share])
    write_sgml(raw / "test-full" / "newstest2014-fren-src.en.sgm", [en for en, _ in test_pairs])
    write_sgml(raw / "test-full" / "newstest2014-fren-ref.fr.sgm", [fr for _, fr in test_pairs])


@pytest.mark.parametrize("subword", ["subword-nmt", "sentencepiece"])
def test_prepare_wmt14_en_fr_tokenizes_cleans_and_binarizes(tmp_path, toy_pairs, subword):
    train_pairs, test_pairs = toy_pairs
    bad_pairs = [("Yes.", "lo " * 10 + "."), ("", "la ."), ("long " * 300, "longue " * 300)]  # removed by cleaning
    pairs = bad_pairs + [(f"{en.capitalize()}, well-known.", f"{fr.capitalize()} d'accord !")
                         for en, fr in train_pairs]
    raw = tmp_path / "raw"
    test_refs = [f"{fr} l\u2019{fr.split()[-1]}" for _, fr in test_pairs]
    write_wmt14_en_fr_layout(raw, pairs, [(f"A well-known {en}.", fr) for (en, _), fr in zip(test_pairs, test_refs)])

    text, dest = tmp_path / "text", tmp_path / "data-bin"
    check([sys.executable, "examples/translation/prepare_wmt.py", "wmt14-en-fr", "--raw-dir", str(raw),
           "--text-dir", str(text), "--dest", str(dest), "--subword", subword, "--bpe-tokens", "300", "--workers", "2"])

    assert (dest / "dict.en.txt").read_text() == (dest / "dict.fr.txt").read_text()  # one joined dictionary
    for split in ("train", "valid", "test"):
        for lang in ("en", "fr"):
            assert (dest / f"{split}.en-fr.{lang}.bin").stat().st_size > 0
    valid_count = len(pairs) // 1333
    train_lines = (text / "train.clean.en").read_text(encoding="utf-8").splitlines()
    assert len(train_lines) == len(pairs) - valid_count - len(bad_pairs)
    assert len((text / "valid.clean.fr").read_text(encoding="utf-8").splitlines()) == valid_count
    assert "well @-@ known" in (text / "test.tok.en").read_text(encoding="utf-8")  # Moses aggressive hyphens
    assert (dest / "test.raw.fr").read_text(encoding="utf-8").splitlines() == test_refs  # as published
    assert "\u2019" not in (text / "test.tok.fr").read_text(encoding="utf-8")  # straightened before tokenizing


def test_prepare_wmt14_en_fr_rejects_a_corpus_with_unequal_sides(tmp_path, toy_pairs):
    train_pairs, test_pairs = toy_pairs
    raw = tmp_path / "raw"
    write_wmt14_en_fr_layout(raw, train_pairs[:500], test_pairs)
    with open(raw / "commoncrawl.fr-en.fr", "a") as f:
        f.write("une ligne de trop\n")
    result = run([sys.executable, "examples/translation/prepare_wmt.py", "wmt14-en-fr", "--raw-dir", str(raw),
                  "--text-dir", str(tmp_path / "text"), "--dest", str(tmp_path / "data-bin"), "--bpe-tokens", "50",
                  "--workers", "1"])
    assert result.returncode != 0 and "do not have the same number of lines" in result.stderr, result.stderr
    assert not (tmp_path / "data-bin").exists()


def test_prepare_wmt14_en_fr_holds_out_every_1333rd_pair_as_valid(tmp_path):
    pairs = [(f"this is pair {i} .", f"voici la paire {i} .") for i in range(1, 2 * 1333 + 5)]  # numbered from 1
    raw, text = tmp_path / "raw", tmp_path / "text"
    write_wmt14_en_fr_layout(raw, pairs, [("a test .", "un essai .")])
    check([sys.executable, "examples/translation/prepare_wmt.py", "wmt14-en-fr", "--raw-dir", str(raw),
           "--text-dir", str(text), "--dest", str(tmp_path / "data-bin"), "--bpe-tokens", "50", "--workers", "2"])

    def read(name):
        return (text / name).read_text(encoding="utf-8").splitlines()

    for side, lang in enumerate(("en", "fr")):
        held_out = [pairs[1333 - 1][side], pairs[2 * 1333 - 1][side]]  # "... pair 1333 .", "... pair 2666 ."
        assert read(f"valid.tok.{lang}") == held_out
        assert read(f"train.tok.{lang}") == [pair[side] for pair in pairs if pair[side] not in held_out]
        assert [line.replace("@@ ", "") for line in read(f"valid.clean.{lang}")] == held_out  # kept by cleaning


def test_prepare_wmt_cleaning_drops_pairs_longer_than_1_5_times_the_other_side(monkeypatch):
    monkeypatch.syspath_prepend(TRANSLATION)
    from prepare_wmt import keep_pair

    def sentence(tokens):
        return " ".join(["w@@", "x"] * (tokens // 2) + ["y"] * (tokens % 2))  # BPE pieces count as tokens

    for short, long, kept in [(1, 1, True), (2, 3, True), (10, 15, True), (1, 2, False), (2, 4, False),
                              (10, 16, False), (100, 151, False)]:
        assert keep_pair(sentence(short), sentence(long)) is kept, (short, long)
        assert keep_pair(sentence(long), sentence(short)) is kept, (long, short)


def test_prepare_wmt16_en_de_binarizes_google_corpus(tmp_path, toy_pairs):
    train_pairs, test_pairs = toy_pairs
    raw = tmp_path / "wmt16_en_de"
    splits = {"train.tok.clean.bpe.32000": train_pairs[:200], "newstest2013.tok.bpe.32000": test_pairs,
              "newstest2014.tok.bpe.32000": test_pairs}
    for prefix, pairs in splits.items():
        write_lines(raw / f"{prefix}.en", [en for en, _ in pairs])
        write_lines(raw / f"{prefix}.de", [de for _, de in pairs])
    write_lines(raw / "newstest2014.de", [de.capitalize() + "." for _, de in test_pairs])
    dest = tmp_path / "data-bin"
    check([sys.executable, "examples/translation/prepare_wmt.py", "wmt16-en-de", "--raw-dir", str(raw),
           "--dest", str(dest), "--workers", "1"])
    assert (dest / "dict.en.txt").read_text() == (dest / "dict.de.txt").read_text()
    assert (dest / "test.en-de.de.bin").stat().st_size > 0
    assert (dest / "test.raw.de").read_text() == (raw / "newstest2014.de").read_text()


@pytest.mark.parametrize("dataset, missing, url", [
    ("wmt16-en-de", "train.tok.clean.bpe.32000.en", "https://drive.google.com/uc?export=download&id="),
    ("wmt14-en-fr", "europarl-v7.fr-en.en", "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz"),
])
def test_prepare_wmt_names_the_missing_download(tmp_path, dataset, missing, url):
    extra = ["--text-dir", str(tmp_path / "text")] if dataset == "wmt14-en-fr" else []
    result = run([sys.executable, "examples/translation/prepare_wmt.py", dataset, "--raw-dir", str(tmp_path / "raw"),
                  "--dest", str(tmp_path / "data-bin"), *extra])
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and missing in error[0] and url in error[0], result.stderr
    assert not (tmp_path / "data-bin").exists() and not (tmp_path / "text").exists()


# WMT training recipe: the paper's batch for 1 to 8 GPUs, and flags fairseq accepts.


def binarized_names(data_bin, task):
    """The files of fairseq-preprocess --joined-dictionary that train_wmt.sh checks for, empty."""
    data_bin.mkdir()
    target = task.split("-")[1]
    for name in ["dict.en.txt", f"dict.{target}.txt", f"train.{task}.en.idx", f"valid.{task}.en.idx"]:
        (data_bin / name).touch()
    return str(data_bin)


@pytest.mark.parametrize("task, batch_tokens, arch, lr, dropout, max_update", [
    ("en-de", 28672, "revcol_transformer", 5e-4, 0.3, 300000),
    ("en-fr", 86016, "revcol_transformer_wmt_en_fr", 7e-4, 0.1, 200000),
])
def test_train_recipe_reaches_paper_batch_for_1_to_8_gpus(tmp_path, task, batch_tokens, arch, lr, dropout, max_update):
    from fairseq import options

    data_bin = binarized_names(tmp_path / "data-bin", task)
    for gpus in range(1, 9):
        result = check(["bash", "examples/translation/train_wmt.sh", task, data_bin, str(tmp_path / "checkpoints")],
                       GPUS=str(gpus), DRY_RUN="1")
        argv = shlex.split(result.stdout.splitlines()[-1])
        argv = argv[argv.index("fairseq_cli.train") + 1:]
        args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
        tokens = gpus * args.max_tokens * args.update_freq[0]
        assert args.max_tokens <= 3584 and 0.999 * batch_tokens <= tokens <= batch_tokens
        assert args.distributed_world_size == gpus
        assert (args.arch, args.lr, args.dropout, args.max_update) == (arch, [lr], dropout, max_update)
        assert args.fp16 and args.share_all_embeddings and args.warmup_updates == 4000
        assert args.adam_betas == "(0.9, 0.98)" and args.label_smoothing == 0.1 and args.clip_norm == 0.0
        assert (args.optimizer, args.weight_decay, args.lr_scheduler, args.warmup_init_lr) == \
            ("adam", 0.0, "inverse_sqrt", 1e-7)
        assert (args.save_interval_updates, args.keep_interval_updates) == (2000, 10)  # the last 10 for averaging


@pytest.mark.parametrize("gpus", ["0", "9", "16", "two"])
def test_train_recipe_rejects_bad_gpu_count(tmp_path, gpus):
    data_bin = binarized_names(tmp_path / "data-bin", "en-de")
    result = run(["bash", "examples/translation/train_wmt.sh", "en-de", data_bin, str(tmp_path / "checkpoints")],
                 GPUS=gpus, DRY_RUN="1")
    assert result.returncode == 2 and result.stderr == f"error: GPUS must be 1 to 8, got '{gpus}'\n"


@pytest.mark.parametrize("missing", ["", "dict.fr.txt", "valid.en-fr.en.idx"])
def test_train_recipe_names_missing_data(tmp_path, missing):
    data_bin = binarized_names(tmp_path / "data-bin", "en-fr")
    if missing:
        (tmp_path / "data-bin" / missing).unlink()
    else:
        shutil.rmtree(data_bin)
    result = run(["bash", "examples/translation/train_wmt.sh", "en-fr", data_bin, str(tmp_path / "checkpoints")],
                 GPUS="1")
    error = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(error) == 1, result.stderr
    assert f"{data_bin}/{missing or 'dict.en.txt'} does not exist" in error[0]
    assert not (tmp_path / "checkpoints").exists()
