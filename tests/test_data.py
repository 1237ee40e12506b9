"""data.py: split sizes and label counts pinned from the real files (counted once with the csv/json modules in a
throwaway script, not with data.py), text repair, the IEMOCAP parser on a synthetic fixture, the prompt template,
label token ids, truncation, video descriptions."""
import io
import json
import shutil
from pathlib import Path

import pytest

import data
import llama

FIXTURES = Path(__file__).parent / "fixtures"

MELD = {  # split: (dialogues, utterances, label counts)
    "train": (1038, 9989, {"neutral": 4710, "surprise": 1205, "fear": 268, "sadness": 683, "joy": 1743,
                           "disgust": 271, "anger": 1109}),
    "dev": (114, 1109, {"neutral": 470, "surprise": 150, "fear": 40, "sadness": 111, "joy": 163, "disgust": 22,
                        "anger": 153}),
    "test": (280, 2610, {"neutral": 1256, "surprise": 281, "fear": 50, "sadness": 208, "joy": 402, "disgust": 68,
                         "anger": 345}),
}
EMORY_CSV = {
    "train": (659, 7551, {"neutral": 2485, "joyful": 1677, "peaceful": 638, "powerful": 551, "scared": 941,
                          "mad": 785, "sad": 474}),
    "dev": (89, 954, {"neutral": 322, "joyful": 205, "peaceful": 82, "powerful": 70, "scared": 127, "mad": 97,
                      "sad": 51}),
    "test": (79, 984, {"neutral": 288, "joyful": 217, "peaceful": 111, "powerful": 96, "scared": 116, "mad": 86,
                       "sad": 70}),
}
EMORY_JSON = {
    "dev": (99, 1344, {"neutral": 393, "joyful": 289, "peaceful": 132, "powerful": 134, "scared": 178, "mad": 143,
                       "sad": 75}),
    "test": (85, 1328, {"neutral": 349, "joyful": 282, "peaceful": 159, "powerful": 145, "scared": 182, "mad": 113,
                        "sad": 98}),
}


def _counts(dialogues):
    labels = {}
    for d in dialogues:
        for u in d:
            labels[u["label"]] = labels.get(u["label"], 0) + 1
    return len(dialogues), sum(map(len, dialogues)), labels


@pytest.mark.parametrize("dataset,table", [("meld", MELD), ("emorynlp", EMORY_CSV), ("emorynlp-json", EMORY_JSON)])
def test_real_counts(data_dir, dataset, table):
    for split, expected in table.items():
        dialogues = data.load_split(dataset, split, data_dir)
        assert _counts(dialogues) == expected, (dataset, split)
        for d in dialogues:
            assert len({u["dialogue_id"] for u in d}) == 1
            assert [u["utterance_id"] for u in d] == sorted({u["utterance_id"] for u in d})


def test_real_dialogue_shape(data_dir):
    meld = data.load_split("meld", "train", data_dir)[0]
    assert (meld[0]["dialogue_id"], meld[0]["utterance_id"], meld[0]["speaker"]) == (0, 0, "Chandler")
    emory = data.load_split("emorynlp", "dev", data_dir)
    several = [u for d in emory for u in d if ", " in u["speaker"]]
    assert len(several) == 4  # 3 rows with two speakers, 1 with three
    assert emory[0][0]["dialogue_id"].startswith("s0") and isinstance(emory[0][0]["utterance_id"], int)


def test_fix_text():
    assert data.fix_text("don\x92t  stop\x85 ") == "don’t stop…"  # C1 characters (cp1252 bytes read as Latin-1)
    assert data.fix_text(b"don\x92t caf\xc3\xa9".decode("utf-8", "surrogateescape")) == "don’t café"  # raw bytes
    # UTF-8 read as cp1252 / Latin-1 (” is e2 80 9d; 0x9d is undefined in cp1252, so it appears as U+009D)
    assert data.fix_text("donâ€™t â€œyesâ€\x9d Â\x92") == "don’t “yes” ’"
    assert data.fix_text("café — “hi”  ’") == "café — “hi” ’"  # correct text stays


def test_raw_cp1252_bytes_in_csv(tmp_path):
    path = tmp_path / "dev_sent_emo.csv"
    path.write_bytes(b"Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\r\n"
                     b"1,I\x92m  fine.,Ross,joy,positive,3,1\r\n2,Yeah.,Rachel,neutral,neutral,3,0\r\n")
    (d,) = data.load_meld(path, "dev")
    assert [(u["utterance_id"], u["text"]) for u in d] == [(0, "Yeah."), (1, "I’m fine.")]


def test_real_text_repair(data_dir):
    """The Meld-Captioning transcripts hold cp1252 bytes as C1 characters; repaired, they equal the MELD CSV text."""
    records = json.loads((data_dir / "meld_video_descriptions/sorted_annotations.json").read_text(encoding="utf-8"))
    rec = next(r for r in records if r["video_id"] == "dia239_utt7.mp4")
    assert rec["transcript"] == "Don\x92t you have to use the bathroom?"
    utt = next(u for u in data.load_split("meld", "test", data_dir)[239] if u["utterance_id"] == 7)
    assert data.fix_text(rec["transcript"]) == utt["text"] == "Don’t you have to use the bathroom?"


def test_csv_errors(tmp_path):
    path = tmp_path / "train_sent_emo.csv"
    path.write_text("Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\nHi.,Ross,joy,0,0\nHm.,Ross,happy,0,1\n")
    with pytest.raises(ValueError, match=r"train_sent_emo.csv:3: unknown meld label 'happy'"):
        data.load_meld(path, "train")
    path.write_text("Utterance,Speaker,Dialogue_ID,Utterance_ID\nHi.,Ross,0,0\n")
    with pytest.raises(ValueError, match=r"train_sent_emo.csv:1: missing column\(s\) \['Emotion'\]"):
        data.load_meld(path, "train")
    path.write_text("Utterance,Speaker,Emotion,Scene_ID,Utterance_ID,Season,Episode\n"
                    "Hi.,\"__import__('os')\",Joyful,1,1,1,1\n")
    with pytest.raises(ValueError, match=r":2: Speaker .* is not a list of strings"):
        data.load_emorynlp_csv(path, "train")
    path.write_text("Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\nHi.,Ross,joy,0,0\nHm.,Ross,joy,x1,1\n")
    with pytest.raises(ValueError, match=r"train_sent_emo.csv:3: column Dialogue_ID is 'x1'; expected an integer"):
        data.load_meld(path, "train")


def test_negative_window_is_refused():
    with pytest.raises(ValueError, match="window"):
        data.build_examples([[data._utt("meld", "test", 0, 0, "Ross", "Hi.", "joy")]], -1)


def test_meld_download_checks_sha(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not the MELD file"))
    with pytest.raises(ValueError, match="sha256"):
        data.load_split("meld", "dev", tmp_path)
    assert not list(tmp_path.rglob("*.csv*"))  # no file, no partial .tmp
    blob = b"good bytes"
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob))
    monkeypatch.setitem(data.MELD_SHA256, "dev_sent_emo.csv", data.hashlib.sha256(blob).hexdigest())
    data.fetch_meld(tmp_path / "meld/dev_sent_emo.csv")
    assert (tmp_path / "meld/dev_sent_emo.csv").read_bytes() == blob and "downloaded" in capsys.readouterr().out


def test_emorynlp_json_fixture(tmp_path):
    """A synthetic train file in the official JSON shape (the real one is not available here)."""
    (tmp_path / "emorynlp").mkdir()
    shutil.copy(FIXTURES / "emorynlp/synthetic-train.json", tmp_path / "emorynlp/emotion-detection-trn.json")
    dialogues = data.load_split("emorynlp-json", "train", tmp_path)
    assert [[(u["utterance_id"], u["speaker"], u["label"]) for u in d] for d in dialogues] == [
        [(1, "Monica Geller", "neutral"), (2, "Ross Geller", "sad"), (3, "Joey Tribbiani, Chandler Bing", "joyful")],
        [(1, "Rachel Green", "scared")],
        [(1, "Phoebe Buffay", "mad"), (2, "Monica Geller", "peaceful"), (3, "Chandler Bing", "powerful")]]
    assert dialogues[0][0]["text"] == "There's nothing to tell!" and dialogues[0][0]["dialogue_id"] == "s01_e01_c01"


def test_iemocap_fixture():
    splits, skipped = data.load_iemocap(FIXTURES / "iemocap/IEMOCAP_full_release")
    rows = {s: [(u["dialogue_id"], u["utterance_id"], u["speaker"], u["label"]) for d in ds for u in d]
            for s, ds in splits.items()}
    assert rows == {
        "dev": [("Ses01F_impro01", "Ses01F_impro01_F000", "F", "neutral"),
                ("Ses01F_impro01", "Ses01F_impro01_M000", "M", "frustrated"),
                ("Ses01F_impro01", "Ses01F_impro01_M001", "M", "angry")],
        "train": [("Ses01M_script01_1", "Ses01M_script01_1_M000", "M", "excited"),
                  ("Ses01M_script01_1", "Ses01M_script01_1_F000", "F", "neutral"),
                  ("Ses01M_script01_1", "Ses01M_script01_1_M001", "M", "happy"),
                  ("Ses02F_impro03", "Ses02F_impro03_F000", "F", "sad"),
                  ("Ses02F_impro03", "Ses02F_impro03_M000", "M", "neutral")],
        "test": [("Ses05F_impro01", "Ses05F_impro01_F000", "F", "neutral"),
                 ("Ses05F_impro01", "Ses05F_impro01_F001", "F", "excited"),
                 ("Ses05F_impro01", "Ses05F_impro01_M001", "M", "happy")]}
    assert dict(skipped) == {"code xxx": 1, "code sur": 1, "code fea": 1, "no evaluation": 1}  # MXX0 has none
    assert splits["dev"][0][2]["text"] == "Let me see them." and splits["test"][0][0]["split"] == "test"
    with pytest.raises(FileNotFoundError, match="Session3"):  # the fixture has Sessions 1, 2, 5 only
        data.load_split("iemocap", "test", FIXTURES)


@pytest.mark.parametrize("folder,line_no,bad,message", [
    ("transcriptions", 2, "Ses01F_impro01_M000: Do you have your forms?", "malformed line"),  # no timestamp
    ("transcriptions", 3, "Ses01F_impro01_F001 [010.0100-011.3925] Yeah.", "malformed line"),  # no colon
    ("EmoEvaluation", 3, "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu", "malformed line"),  # no V/A/D
    ("EmoEvaluation", 3, "[6.2901 - x]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]", "malformed line"),
    ("EmoEvaluation", 4, "Neutral; ()", "malformed line"),  # neither summary, header nor annotator line
])
def test_iemocap_malformed(tmp_path, folder, line_no, bad, message):
    root = tmp_path / "IEMOCAP_full_release"
    shutil.copytree(FIXTURES / "iemocap/IEMOCAP_full_release", root)
    path = root / "Session1/dialog" / folder / "Ses01F_impro01.txt"
    lines = path.read_text().splitlines()
    lines[line_no - 1] = bad
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"Ses01F_impro01.txt:{line_no}: {message}"):
        data.load_iemocap(root)


def test_datasets_for(tmp_path, capsys):
    assert data.datasets_for("meld,iemocap") == ["meld", "iemocap"]
    with pytest.raises(ValueError, match="unknown dataset"):
        data.datasets_for("meld,friends")
    (tmp_path / "meld").mkdir()
    for name in data.MELD_SHA256:
        (tmp_path / "meld" / name).write_text("")
    assert data.datasets_for("all", tmp_path) == ["meld"]
    out = capsys.readouterr().out
    assert "not found" in out and "'emorynlp', 'iemocap'" in out
    with pytest.raises(FileNotFoundError):
        data.datasets_for("all", tmp_path / "empty")


GOLDEN = ("Name the emotion of the Input utterance. Answer with one label only.\n"
          "Labels: neutral, surprise, fear, sadness, joy, disgust, anger\n"
          "### Context:\n"
          "Chandler: That I did. That I did.\n"
          "The Interviewer: So let’s talk a little bit about your duties.\n"
          "{video}"
          "### Input:\n"
          "Chandler: My duties? All right.\n"
          "### Response:\n")


def test_golden_prompt(data_dir):
    dialogue = data.load_split("meld", "train", data_dir)[0]
    (ex,) = [e for e in data.build_examples([dialogue], window=2) if e["utterance_id"] == 4]
    assert ex["prompt"] == GOLDEN.format(video="") and ex["label"] == "surprise" and not ex["has_description"]
    desc = {("meld", "train", 0, 4): "A man in a suit sits across a desk."}
    (ex,) = [e for e in data.build_examples([dialogue], 2, desc) if e["utterance_id"] == 4]
    assert ex["prompt"] == GOLDEN.format(video="### Video:\nA man in a suit sits across a desk.\n")
    assert ex["has_description"]
    first = data.build_examples([dialogue], 2)[0]["prompt"]
    assert "### Context:" not in first
    assert first.endswith("### Input:\nChandler: also I was the point person on my company’s transition from the "
                          "KL-5 to GR-6 system.\n### Response:\n")


@pytest.fixture(scope="module")
def tok(shared_models):
    return llama.load_tokenizer(shared_models / "llama2-tokenizer")


def test_label_token_ids_in_context(tok, data_dir):
    ids = data.label_token_ids(tok, data.LABELS["meld"])
    assert ids["neutral"] != tok.encode("neutral")  # the leading-space trap: alone it is "▁neutral"
    for example in data.build_examples(data.load_split("meld", "dev", data_dir)[:3], window=2):
        full = tok.encode(example["prompt"] + example["label"], bos=True)
        assert full == tok.encode(example["prompt"], bos=True) + ids[example["label"]]
        encoded, n_answer = data.encode_example(tok, example, 512)
        assert encoded == full + [tok.eos_id] and n_answer == len(ids[example["label"]]) + 1
        assert encoded.count(tok.bos_id) == 1 and encoded[0] == tok.bos_id


def test_encode_example_truncates_oldest_context(tok):
    dialogue = [{"dataset": "meld", "split": "test", "dialogue_id": 1, "utterance_id": i, "speaker": s,
                 "text": t, "label": "joy"} for i, (s, t) in enumerate(
        [("Ross", "first " * 20), ("Rachel", "second " * 20), ("Joey", "How you doin'?")])]
    example = data.build_examples([dialogue], window=2)[-1]
    full, n = data.encode_example(tok, example, 1000)
    no_first = tok.encode(data.make_prompt(dialogue[1:2], dialogue[2], example["labels"]), bos=True)
    assert len(no_first) + n < len(full)
    ids, n_answer = data.encode_example(tok, example, len(no_first) + n)  # room for all but the oldest utterance
    assert ids[:-n_answer] == no_first and ids[-n_answer:] == full[-n:] and len(ids) <= len(no_first) + n
    bare = tok.encode(data.make_prompt([], dialogue[2], example["labels"]), bos=True)
    ids, _ = data.encode_example(tok, example, len(bare) + n)
    assert ids == bare + full[-n:] and "Rachel" not in tok.decode(ids)
    with pytest.raises(ValueError, match=r"meld dialogue 1 utterance 2: \d+ prompt \+ 3 answer tokens"):
        data.encode_example(tok, example, len(bare) + n - 1)


def test_descriptions(data_dir, tmp_path):
    out = tmp_path / "meld_descriptions.jsonl"
    src = data_dir / "meld_video_descriptions/sorted_annotations.json"
    assert data.convert_meld_annotations(src, out) == 191
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 191 and all(set(r) == {"dataset", "split", "dialogue_id", "utterance_id",
                                                    "description"} for r in records)
    raw = {r["video_id"]: r for r in json.loads(src.read_text(encoding="utf-8"))}
    for r in records:  # only the objective visual description; the summaries (which leak the label) never appear
        rec = raw[f"dia{r['dialogue_id']}_utt{r['utterance_id']}.mp4"]
        assert r["description"] == data.fix_text(rec["visual_objective_description"])
        assert data.fix_text(rec["fine-grained_summary"])[:200] not in r["description"]
    descriptions = data.load_descriptions(out)
    assert descriptions[("meld", "test", 233, 4)].startswith("In this video frame, two women")
    examples = data.build_examples(data.load_split("meld", "test", data_dir), 2, descriptions)
    assert sum(e["has_description"] for e in examples) == 191
    (ex,) = [e for e in examples if (e["dialogue_id"], e["utterance_id"]) == (233, 4)]
    assert "### Video:\nIn this video frame, two women" in ex["prompt"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(out.read_text().splitlines()[0] + "\n{\"dataset\": \"meld\"}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: KeyError"):
        data.load_descriptions(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: JSONDecodeError"):
        data.load_descriptions(bad)
