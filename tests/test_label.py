"""eval.py --input / label.label_conversations: your own conversations labelled as evaluation labels them (context
window, template, label set, dev-fitted offsets), from JSONL or CSV, stdin to stdout; bad input named in one line
before the model loads; and, on real MELD dev, the labels eval.predict + eval.apply_offsets give."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import data
import eval as ev
import label
import llama
import lora
from helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BIAS = {"meld": [0.5, -0.3, 0.2, 0.0, 0.8, -1.0, 0.1], "emorynlp": [0.0, 0.3, -0.2, 0.1, 0.0, 0.4, -0.5]}
TALKS = [{"id": "cafe", "utterances": [
             {"speaker": "Ross", "text": "We were on a break!"},
             {"speaker": "Rachel", "text": "  You  said\nwe were taking a break.", "description": "She frowns."},
             {"speaker": "Ross", "text": "That is not the same thing."}]},
         {"id": 7, "utterances": [{"speaker": "Joey", "text": "How you doin'?"}]}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, shared_models):
    """A train.py-format checkpoint (MELD + EmoryNLP, known label offsets) with a random nonzero adapter."""
    folder = tmp_path_factory.mktemp("label")
    make_checkpoint(folder / "model", shared_models, std=0.3)
    model, _ = llama.load(folder / "model")
    lora.apply_lora(model, ["wq", "wv"], 4, 8, verbose=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.1)
    config = dict(model=str(folder / "model"), targets="wq,wv", r=4, lora_alpha=8, data="meld,emorynlp",
                  window=2, max_len=400)
    labels = {name: data.LABELS[name] for name in ("meld", "emorynlp")}
    cli.atomic_write(folder / "ckpt.pt", dict(config=config, labels=labels, label_bias=BIAS,
                                              lora=lora.lora_state_dict(model)))
    return folder / "ckpt.pt"


@pytest.fixture(scope="module")
def loaded(ckpt):
    return ev.load_checkpoint(ckpt)


def write_jsonl(path: Path, conversations) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    return path


def write_csv(path: Path, conversations) -> Path:
    """The conversations as a CSV with MELD's columns in another order, each conversation's rows reversed."""
    rows = [dict(Dialogue_ID=n, Utterance_ID=i, Speaker=u["speaker"], Utterance=u["text"])
            for n, c in enumerate(conversations) for i, u in reversed(list(enumerate(c["utterances"])))]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["Utterance_ID", "Speaker", "Utterance", "Dialogue_ID"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def label_file(capsys, ckpt, *args) -> list[dict]:
    capsys.readouterr()
    ev.main([str(ckpt), "--input", *map(str, args), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert "label set: meld" in err or "--label-set" in args
    return [json.loads(line) for line in out.splitlines()]


def independent(loaded, conversations, name="meld", descriptions=True) -> list[list[float]]:
    """Each utterance's offset label scores from eval.predict on examples that data.build_examples makes."""
    model, tok, ckpt = loaded
    dialogues = [[dict(dataset=name, split="x", dialogue_id=n, utterance_id=i, label=data.LABELS[name][0],
                       speaker=data.fix_text(u["speaker"]), text=data.fix_text(u["text"]))
                  for i, u in enumerate(c["utterances"])] for n, c in enumerate(conversations)]
    described = {(name, "x", n, i): u["description"] for n, c in enumerate(conversations)
                 for i, u in enumerate(c["utterances"]) if descriptions and u.get("description")}
    rows = ev.predict(model, tok, data.build_examples(dialogues, 2, described), 400, progress=False)
    return [[r["scores"][label] + b for label, b in zip(data.LABELS[name], BIAS[name])] for r in rows]


def check_rows(rows, conversations, shifted, labels=data.LABELS["meld"]):
    """Input order, fields as given, probs = softmax of the offset scores, label = their argmax."""
    flat = [(c["id"], i, u) for c in conversations for i, u in enumerate(c["utterances"])]
    assert [(r["id"], r["index"], r["speaker"], r["text"]) for r in rows] == [
        (cid, i, u["speaker"], u["text"]) for cid, i, u in flat]
    for r, s in zip(rows, shifted):
        assert list(r["probs"]) == labels
        assert sum(r["probs"].values()) == pytest.approx(1, abs=1e-9)
        assert list(r["probs"].values()) == pytest.approx(torch.tensor(s).softmax(0).tolist(), abs=1e-6)
        assert r["label"] == max(r["probs"], key=r["probs"].get) == labels[max(range(len(s)), key=s.__getitem__)]


def test_jsonl_with_descriptions(capsys, ckpt, loaded, tmp_path):
    rows = label_file(capsys, ckpt, write_jsonl(tmp_path / "talks.jsonl", TALKS))
    shifted = independent(loaded, TALKS)
    check_rows(rows, TALKS, shifted)
    assert independent(loaded, TALKS, descriptions=False)[1] != pytest.approx(shifted[1], abs=1e-3)  # it was read


def test_csv_with_multiline_utterances_in_utterance_id_order(capsys, ckpt, loaded, tmp_path):
    rows = label_file(capsys, ckpt, write_csv(tmp_path / "talks.csv", TALKS))
    as_csv = [dict(c, id=n, utterances=[dict(u, description=None) for u in c["utterances"]])
              for n, c in enumerate(TALKS)]  # a CSV has no descriptions; its ids are Dialogue_ID
    check_rows(rows, as_csv, independent(loaded, TALKS, descriptions=False))
    assert rows[1]["text"] == TALKS[0]["utterances"][1]["text"]  # the line break kept, as given


def test_stdin_to_stdout_and_another_label_set(ckpt, loaded, tmp_path):
    cmd = [sys.executable, "eval.py", str(ckpt), "--input", "-", "--format", "jsonl", "--device", "cpu",
           "--label-set", "emorynlp"]
    done = subprocess.run(cmd, cwd=ROOT, input="".join(json.dumps(c) + "\n" for c in TALKS), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "label set: emorynlp" in done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]  # stdout holds the labels and nothing else
    check_rows(rows, TALKS, independent(loaded, TALKS, "emorynlp"), data.LABELS["emorynlp"])


def test_python_function_and_an_utterance_over_max_len(capsys, loaded, monkeypatch):
    """An utterance too long for max_len is scored on its end: the start is cut, the last words kept."""
    model, tok, ckpt = loaded
    short = dict(ckpt, config=dict(ckpt["config"], max_len=160))
    text = " ".join(f"word{i}" for i in range(300))  # every word distinct, so what was cut can be seen
    long = [{"utterances": [{"speaker": "Ross", "text": "Hi."}, {"speaker": "Monica", "text": text}]}]
    scored, predict = [], ev.predict
    monkeypatch.setattr(ev, "predict", lambda model, tok, examples, *a, **k: scored.extend(examples) or predict(
        model, tok, examples, *a, **k))
    capsys.readouterr()
    rows = label.label_conversations(ev.predict, model, tok, short, long)
    assert "cut the start of 1 utterance(s)" in capsys.readouterr().err
    assert [(r["id"], r["index"], r["text"]) for r in rows] == [(0, 0, "Hi."), (0, 1, text)]  # reported as given
    kept = scored[1]["target"]["text"]
    assert text.endswith(kept) and 20 <= len(kept) < len(text) // 2  # its start cut (by characters), not emptied
    prompt = ev.prompt_ids(tok, scored[1], 160)  # what the model read
    assert len(prompt) < 160 and "word299" in tok.decode(prompt) and "word0 " not in tok.decode(prompt)
    with pytest.raises(cli.UsageError, match="--label-set.*meld, emorynlp"):
        label.label_conversations(ev.predict, model, tok, ckpt, TALKS, label_set="iemocap")


BAD = [  # (file name, content, flags, expected in the one line)
    ("a.jsonl", '{"utterances": [{"speaker": "A", "text": "hi"}]}\n{oops\n', [], "a.jsonl:2: JSONDecodeError"),
    ("a.jsonl", "[1, 2]\n", [], "a.jsonl:1: expected an object"),
    ("a.jsonl", '{"id": 1}\n', [], "'utterances'"),
    ("a.jsonl", '{"utterances": []}\n', [], "non-empty list 'utterances'"),
    ("a.jsonl", '{"utterances": [{"text": "hi"}]}\n', [], "utterances[0] key 'speaker' is missing"),
    ("a.jsonl", '{"utterances": [{"speaker": "A", "text": 3}]}\n', [], "key 'text' is 3"),
    ("a.jsonl", b'{"utterances": [{"speaker": "A", "text": "caf\xe9"}]}\n', [], "a.jsonl:1: byte 0xe9"),
    ("a.csv", "Dialogue_ID,Speaker,Utterance\n0,A,hi\n", [], "missing column(s) ['Utterance_ID']"),
    ("a.csv", "Dialogue_ID,Utterance_ID,Speaker,Utterance\n0,x,A,hi\n", [], "a.csv:2: column Utterance_ID"),
    ("a.csv", "Dialogue_ID,Utterance_ID,Speaker,Utterance\n0,0,A,hi\n0,0,B,yo\n", [], "a.csv:3: Dialogue_ID 0"),
    ("a.txt", "", [], "--format"),
    ("a.jsonl", "", ["--data", "meld", "--limit", "3"], "--data, --limit"),
    ("a.jsonl", "", ["--label-set", "iemocap"], "--label-set: unknown 'iemocap'; expected one of meld, emorynlp"),
    ("a.jsonl", "", ["--format", "xml"], "argument --format"),
]


@pytest.mark.parametrize("name,content,flags,expected", BAD, ids=[f"{b[0]}-{b[3][:20]}" for b in BAD])
def test_bad_input_gets_one_line_before_the_model_loads(capsys, ckpt, tmp_path, name, content, flags, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    no_model = tmp_path / "ckpt.pt"  # a checkpoint whose base model is gone: it must never be needed
    saved = torch.load(ckpt, weights_only=True)
    torch.save(dict(saved, config=dict(saved["config"], model=str(tmp_path / "gone"))), no_model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: ev.main([str(no_model), "--input", str(path), *flags]))
    out, err = capsys.readouterr()
    assert e.value.code == (2 if "--" in expected else 1)
    lines = err.strip().splitlines()
    assert out == "" and expected in lines[-1] and "Traceback" not in err and "gone" not in err
    assert len(lines) == 1 or expected.startswith("argument")  # argparse's own errors come after its usage


# ---------------------------------------------------------------- real MELD dev

def test_a_real_meld_dev_dialogue_gets_the_labels_of_evaluation(capsys, ckpt, loaded, data_dir, tmp_path):
    """One MELD dev dialogue written out with MELD's columns, labelled through --input, equals eval.predict +
    eval.apply_offsets on the same utterances of data.load_split."""
    model, tok, saved = loaded
    dialogue = data.load_split("meld", "dev", data_dir)[1]
    with open(data_dir / "meld/dev_sent_emo.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if int(r["Dialogue_ID"]) == dialogue[0]["dialogue_id"]]
    with open(tmp_path / "dialogue.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, reader.fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    examples = data.build_examples([dialogue], saved["config"]["window"])
    assert len(examples) >= 5
    for e in examples:  # nothing is truncated, so the gold label's length does not matter
        assert len(tok.encode(data.prompt_of(e), bos=True)) + 10 < saved["config"]["max_len"]
    want = ev.predict(model, tok, examples, saved["config"]["max_len"], progress=False)
    want = ev.apply_offsets(want, saved["label_bias"])
    got = label_file(capsys, ckpt, tmp_path / "dialogue.csv")
    assert [r["label"] for r in got] == [r["pred"] for r in want]
    assert len({r["label"] for r in got}) > 1
    assert [r["text"] for r in got] == [r["Utterance"] for r in sorted(rows, key=lambda r: int(r["Utterance_ID"]))]
    assert [r["index"] for r in got] == [u["utterance_id"] for u in dialogue]  # MELD numbers them from 0
