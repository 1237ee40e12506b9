"""data.py: split sizes and label counts pinned from the real files (counted once with the csv/json modules in a
throwaway script, not with data.py), the IEMOCAP parser on a synthetic fixture, the prompt template, label token
ids, truncation, video descriptions (and convert.py's MELD download and description conversion), and one clear
error per bad input file or flag."""
import hashlib
import io
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import cli
import convert
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


def _counts(dialogues):
    labels = {}
    for d in dialogues:
        for u in d:
            labels[u["label"]] = labels.get(u["label"], 0) + 1
    return len(dialogues), sum(map(len, dialogues)), labels


@pytest.mark.parametrize("dataset,table", [("meld", MELD), ("emorynlp", EMORY_CSV)])
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
    assert data.fix_text(" I\tdon’t\n\n know  —  café. ") == "I don’t know — café."  # only whitespace changes


def test_csv_is_strict_utf8(tmp_path):
    path = tmp_path / "dev_sent_emo.csv"
    path.write_bytes(b"\xef\xbb\xbfSr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\r\n"
                     b"1,I\xe2\x80\x99m  fine.,Ross,joy,positive,3,1\r\n2,Yeah.,Rachel,neutral,neutral,3,0\r\n")
    (d,) = convert.load_meld(path, "dev", data.LABELS["meld"])  # a BOM is removed
    assert [(u["utterance_id"], u["text"]) for u in d] == [(0, "Yeah."), (1, "I’m fine.")]
    path.write_bytes(path.read_bytes().replace(b"\xe2\x80\x99", b"\x92"))  # Windows-1252: not repaired, refused
    with pytest.raises(cli.UserError, match=r"dev_sent_emo.csv:2: byte 0x92 is not UTF-8"):
        convert.load_meld(path, "dev", data.LABELS["meld"])


def test_csv_errors(tmp_path):
    path = tmp_path / "train_sent_emo.csv"
    path.write_text("Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\nHi.,Ross,joy,0,0\nHm.,Ross,happy,0,1\n")
    with pytest.raises(ValueError, match=r"train_sent_emo.csv:3: unknown meld label 'happy'"):
        convert.load_meld(path, "train", data.LABELS["meld"])
    path.write_text("Utterance,Speaker,Dialogue_ID,Utterance_ID\nHi.,Ross,0,0\n")
    with pytest.raises(ValueError, match=r"train_sent_emo.csv:1: missing column\(s\) \['Emotion'\]"):
        convert.load_meld(path, "train", data.LABELS["meld"])
    path.write_text("Utterance,Speaker,Emotion,Scene_ID,Utterance_ID,Season,Episode\n"
                    "Hi.,\"__import__('os')\",Joyful,1,1,1,1\n")
    with pytest.raises(ValueError, match=r":2: Speaker .* is not a list of strings"):
        convert.load_emorynlp(path, "train", data.LABELS["emorynlp"])
    path.write_text("Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\nHi.,Ross,joy,0,0\nHm.,Ross,joy,x1,1\n")
    with pytest.raises(ValueError, match=r"train_sent_emo.csv:3: column Dialogue_ID is 'x1'; expected an integer"):
        convert.load_meld(path, "train", data.LABELS["meld"])


def test_negative_window_is_refused():
    with pytest.raises(ValueError, match="window"):
        data.build_examples([[dict(dataset="meld", split="test", dialogue_id=0, utterance_id=0, speaker="Ross",
                                   text="Hi.", label="joy")]], -1)


def test_meld_download_checks_sha(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not the MELD file"))
    with pytest.raises(ValueError, match="sha256"):
        data.load_split("meld", "dev", tmp_path)
    assert not list(tmp_path.rglob("*.csv*"))  # no file, no partial .tmp
    blob = b"good bytes"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob))
    monkeypatch.setitem(convert.MELD_SHA256, "dev_sent_emo.csv", hashlib.sha256(blob).hexdigest())
    convert.fetch_meld(tmp_path / "meld/dev_sent_emo.csv")
    assert (tmp_path / "meld/dev_sent_emo.csv").read_bytes() == blob and "downloaded" in capsys.readouterr().out


def test_iemocap_fixture():
    root = FIXTURES / "iemocap/IEMOCAP_full_release"
    splits, skipped = convert.load_iemocap(root, data.LABELS["iemocap"])
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
        convert.load_iemocap(root, data.LABELS["iemocap"])


def test_datasets_for(tmp_path, capsys):
    assert data.datasets_for("meld,iemocap") == ["meld", "iemocap"]
    with pytest.raises(ValueError, match="unknown dataset"):
        data.datasets_for("meld,friends")
    (tmp_path / "meld").mkdir()
    for name in convert.MELD_SHA256:
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
    assert data.prompt_of(ex) == GOLDEN.format(video="")
    assert ex["label"] == "surprise" and not ex["has_description"]
    desc = {("meld", "train", 0, 4): "A man in a suit sits across a desk."}
    (ex,) = [e for e in data.build_examples([dialogue], 2, desc) if e["utterance_id"] == 4]
    assert data.prompt_of(ex) == GOLDEN.format(video="### Video:\nA man in a suit sits across a desk.\n")
    assert ex["has_description"]
    first = data.prompt_of(data.build_examples([dialogue], 2)[0])
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
        full = tok.encode(data.prompt_of(example) + example["label"], bos=True)
        assert full == tok.encode(data.prompt_of(example), bos=True) + ids[example["label"]]
        encoded, n_answer = data.encode_example(tok, example, 512)
        assert encoded == full + [tok.eos_id] and n_answer == len(ids[example["label"]]) + 1
        assert encoded.count(tok.bos_id) == 1 and encoded[0] == tok.bos_id


def test_encode_example_truncates_oldest_context(tok):
    """Context goes oldest first until the prompt fits beside the longest label of the set, whatever the gold
    label: the gold label ("joy", the shortest) never buys a prompt more context."""
    dialogue = [{"dataset": "meld", "split": "test", "dialogue_id": 1, "utterance_id": i, "speaker": s,
                 "text": t, "label": "joy"} for i, (s, t) in enumerate(
        [("Ross", "first " * 20), ("Rachel", "second " * 20), ("Joey", "How you doin'?")])]
    example = data.build_examples([dialogue], window=2)[-1]
    full, n = data.encode_example(tok, example, 1000)
    room = 1 + max(len(ids) for ids in data.label_token_ids(tok, example["labels"]).values())
    assert room > n  # the longest label is longer than the gold one, else this test could not tell them apart
    no_first = tok.encode(data.make_prompt(dialogue[1:2], dialogue[2], example["labels"]), bos=True)
    assert len(no_first) + room < len(full)
    ids, n_answer = data.encode_example(tok, example, len(no_first) + room)  # room for all but the oldest utterance
    assert ids[:-n_answer] == no_first and ids[-n_answer:] == full[-n:] and n_answer == n
    ids, _ = data.encode_example(tok, example, len(no_first) + room - 1)  # the gold label would fit; the longest not
    assert "Rachel" not in tok.decode(ids)
    bare = tok.encode(data.make_prompt([], dialogue[2], example["labels"]), bos=True)
    ids, _ = data.encode_example(tok, example, len(bare) + room)
    assert ids == bare + full[-n:] and "Rachel" not in tok.decode(ids)
    with pytest.raises(ValueError, match=rf"meld dialogue 1 utterance 2: \d+ prompt \+ {room} answer tokens"):
        data.encode_example(tok, example, len(bare) + room - 1)


def test_descriptions(data_dir, tmp_path):
    out = tmp_path / "meld_descriptions.jsonl"
    src = data_dir / "meld_video_descriptions/sorted_annotations.json"
    assert convert.convert_meld_annotations(src, out) == 191
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 191 and all(set(r) == {"dataset", "split", "dialogue_id", "utterance_id",
                                                    "description"} for r in records)
    raw = {r["video_id"]: r for r in json.loads(src.read_text(encoding="utf-8"))}
    for r in records:  # only the objective visual description; the summaries (which leak the label) never appear
        rec = raw[f"dia{r['dialogue_id']}_utt{r['utterance_id']}.mp4"]
        assert r["description"] == " ".join(rec["visual_objective_description"].split())
        assert " ".join(rec["fine-grained_summary"].split())[:200] not in r["description"]
    descriptions = data.load_descriptions(out)
    assert descriptions[("meld", "test", 233, 4)].startswith("In this video frame, two women")
    examples = data.build_examples(data.load_split("meld", "test", data_dir), 2, descriptions)
    assert sum(e["has_description"] for e in examples) == 191
    (ex,) = [e for e in examples if (e["dialogue_id"], e["utterance_id"]) == (233, 4)]
    assert "### Video:\nIn this video frame, two women" in data.prompt_of(ex)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(out.read_text().splitlines()[0] + "\n{\"dataset\": \"meld\"}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: KeyError"):
        data.load_descriptions(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: JSONDecodeError"):
        data.load_descriptions(bad)


# ---------------------------------------------------------------- one clear error per bad input (issue 11)

MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\n"
EMORY_HEADER = "Utterance,Speaker,Emotion,Scene_ID,Utterance_ID,Season,Episode\n"
GOOD = '{"dataset": "meld", "split": "test", "dialogue_id": 1, "utterance_id": 1, "description": "A man."}'


def test_header_without_rows(tmp_path):
    path = tmp_path / "dev_sent_emo.csv"
    path.write_text(MELD_HEADER)
    with pytest.raises(cli.UserError, match=r"dev_sent_emo.csv: a header and no rows"):
        convert.load_meld(path, "dev", data.LABELS["meld"])
    path.write_text(EMORY_HEADER + "\n")
    with pytest.raises(cli.UserError, match=r"dev_sent_emo.csv: a header and no rows"):
        convert.load_emorynlp(path, "dev", data.LABELS["emorynlp"])
    path.write_text("")
    with pytest.raises(cli.UserError, match=r"dev_sent_emo.csv:1: missing column"):
        convert.load_meld(path, "dev", data.LABELS["meld"])


def test_duplicate_ids_name_both_lines(tmp_path):
    path = tmp_path / "test_sent_emo.csv"
    path.write_text(MELD_HEADER + "1,Hi.,Ross,joy,positive,3,0\n2,Yo.,Joey,joy,positive,4,0\n"
                    "3,Hey.,Ross,anger,negative,3,0\n")
    with pytest.raises(cli.UserError, match=r"test_sent_emo.csv:4: dialogue 3 utterance 0 again "
                                            r"\(first at \S*test_sent_emo.csv:2\)"):
        convert.load_meld(path, "test", data.LABELS["meld"])
    path.write_text(EMORY_HEADER + "Hi.,['Ross'],Joyful,1,1,1,2\nHm.,['Ross'],Mad,2,1,1,2\nHo.,['Joey'],Sad,1,1,1,2\n")
    with pytest.raises(cli.UserError, match=r"csv:4: dialogue s01_e02_c01 utterance 1 again \(first at \S*csv:2\)"):
        convert.load_emorynlp(path, "test", data.LABELS["emorynlp"])


def test_iemocap_duplicate_turn(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    shutil.copytree(FIXTURES / "iemocap/IEMOCAP_full_release", root)
    path = root / "Session1/dialog/transcriptions/Ses01F_impro01.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[0]]) + "\n")
    message = (rf"Ses01F_impro01.txt:{len(lines) + 1}: dialogue Ses01F_impro01 utterance Ses01F_impro01_F000 again "
               r"\(first at \S*Ses01F_impro01.txt:1\)")
    with pytest.raises(cli.UserError, match=message):
        convert.load_iemocap(root, data.LABELS["iemocap"])


def test_unclosed_quote_names_the_record_start(tmp_path):
    """A stray quote makes the csv module read the following rows into one field; never a silently merged row."""
    path = tmp_path / "train_sent_emo.csv"
    path.write_text(MELD_HEADER + "1,Hi.,Ross,joy,positive,0,0\n2,\"Oh no.,Ross,sadness,negative,0,1\n"
                    "3,\"Yes.\",Ross,joy,positive,0,2\n4,Fine.,Ross,joy,positive,0,3\n")
    with pytest.raises(cli.UserError, match=r"train_sent_emo.csv:3: a field holds a line break"):
        convert.load_meld(path, "train", data.LABELS["meld"])
    path.write_text(EMORY_HEADER + "Hi.,['Ross'],Joyful,1,1,1,2\n\"Oh,['Ross'],Mad,1,2,1,2\nHo.,['Joey'],Sad,1,3,1,2\n")
    with pytest.raises(cli.UserError, match=r"train_sent_emo.csv:3: a field holds a line break"):
        convert.load_emorynlp(path, "train", data.LABELS["emorynlp"])


@pytest.mark.parametrize("record,message", [
    ('["meld", "test", 1, 1, "A man."]', r"a JSON list; expected an object"),
    ('{"dataset": "meld", "split": "test", "dialogue_id": 1, "utterance_id": 2}',
     r"KeyError: missing key\(s\) \['description'\]"),
    ('{"dataset": 1, "split": "test", "dialogue_id": 1, "utterance_id": 2, "description": "x"}',
     r"key dataset/split is 1/'test'; expected one of meld, emorynlp, iemocap / train, dev, test"),
    ('{"dataset": "meld", "split": "eval", "dialogue_id": 1, "utterance_id": 2, "description": "x"}',
     r"key dataset/split is 'meld'/'eval'"),
    ('{"dataset": "meld", "split": "test", "dialogue_id": "1", "utterance_id": 2, "description": "x"}',
     r"key 'dialogue_id' is '1'; meld ids are int"),
    ('{"dataset": "meld", "split": "test", "dialogue_id": 1, "utterance_id": 2.0, "description": "x"}',
     r"key 'utterance_id' is 2.0; meld ids are int"),
    ('{"dataset": "meld", "split": "test", "dialogue_id": 1, "utterance_id": true, "description": "x"}',
     r"key 'utterance_id' is True; meld ids are int"),
    ('{"dataset": "emorynlp", "split": "test", "dialogue_id": 3, "utterance_id": 2, "description": "x"}',
     r"key 'dialogue_id' is 3; emorynlp ids are str"),
    ('{"dataset": "meld", "split": "test", "dialogue_id": 1, "utterance_id": 2, "description": " "}',
     r"key 'description' is ' '; expected a non-empty string"),
    ('{"dataset": "meld", "split": "test", "dialogue_id": 1, "utterance_id": 2, "description": ["x"]}',
     r"key 'description' is \['x'\]; expected a non-empty string"),
])
def test_description_record_types(tmp_path, record, message):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "\n\n" + record + "\n")
    with pytest.raises(cli.UserError, match=rf"d.jsonl:3: {message}"):
        data.load_descriptions(path)


def test_descriptions_of_every_dataset_and_bad_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    emory = ('{"dataset": "emorynlp", "split": "dev", "dialogue_id": "s01_e01_c01", "utterance_id": 4, '
             '"description": "x"}')
    iemocap = ('{"dataset": "iemocap", "split": "test", "dialogue_id": "Ses05F_impro01", '
               '"utterance_id": "Ses05F_impro01_F000", "description": "y"}')
    path.write_text("\n".join([GOOD, emory, iemocap]) + "\n")
    assert data.load_descriptions(path) == {("meld", "test", 1, 1): "A man.",
                                            ("emorynlp", "dev", "s01_e01_c01", 4): "x",
                                            ("iemocap", "test", "Ses05F_impro01", "Ses05F_impro01_F000"): "y"}
    path.write_text(GOOD + "\n" + iemocap + "\n" + GOOD.replace("A man.", "Another man.") + "\n")
    with pytest.raises(cli.UserError, match=r"d.jsonl:3: a second description of \('meld', 'test', 1, 1\)"):
        data.load_descriptions(path)
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.replace("A man.", "caf\xe9").encode("latin-1") + b"\n")
    with pytest.raises(cli.UserError, match=r"d.jsonl:2: byte 0xe9 is not UTF-8"):
        data.load_descriptions(path)
    with pytest.raises(cli.MissingError, match=r"nothing.jsonl: not found"):
        data.load_descriptions(tmp_path / "nothing.jsonl")


def test_convert_meld_annotations_errors(tmp_path):
    src = tmp_path / "sorted_annotations.json"
    out = tmp_path / "out.jsonl"
    src.write_bytes(b'[{"video_id": "dia1_utt2.mp4",\n "visual_objective_description": "caf\xe9"}]')
    with pytest.raises(cli.UserError, match=r"sorted_annotations.json: not valid JSON \(.*byte 0xe9"):
        convert.convert_meld_annotations(src, out)
    src.write_text('[{"video_id": "dia1_utt2.mp4"\n "visual_objective_description": "x"}]')
    with pytest.raises(cli.UserError, match=r"annotations.json: not valid JSON \(Expecting ',' delimiter: line 2"):
        convert.convert_meld_annotations(src, out)
    src.write_text('{"video_id": "dia1_utt2.mp4"}')
    with pytest.raises(cli.UserError, match=r"sorted_annotations.json: a JSON dict; expected a list"):
        convert.convert_meld_annotations(src, out)
    for records in ('["dia1_utt2.mp4"]', '[{"video_id": "dia1_utt2.mp4", "visual_objective_description": " "}]',
                    '[{"video_id": "dia1.mp4", "visual_objective_description": "x"}]'):
        src.write_text(records)
        with pytest.raises(cli.UserError, match=r"sorted_annotations.json: record 0: need video_id"):
            convert.convert_meld_annotations(src, out)
    with pytest.raises(cli.MissingError, match=r"nothing.json: not found"):
        convert.convert_meld_annotations(tmp_path / "nothing.json", out)
    assert not out.exists()
    src.write_text('[{"video_id": "dia1_utt2.mp4", "visual_objective_description": " A  man\\u2019s\\n hat. "}]')
    assert convert.convert_meld_annotations(src, out) == 1
    assert data.load_descriptions(out) == {("meld", "test", 1, 2): "A man’s hat."}


def test_unknown_names_are_usage_errors(tmp_path):
    assert data.DATASETS == ("meld", "emorynlp", "iemocap") and data.SPLITS == ("train", "dev", "test")
    with pytest.raises(cli.UsageError, match=r"--data: unknown 'friends'; expected one of meld, emorynlp, iemocap"):
        data.load_split("friends", "test", tmp_path)
    with pytest.raises(cli.UsageError, match=r"--data: unknown 'emorynlp-json'"):  # the JSON release is gone
        data.load_split("emorynlp-json", "test", tmp_path)
    with pytest.raises(cli.UsageError, match=r"--split: unknown 'valid'; expected one of train, dev, test"):
        data.load_split("meld", "valid", tmp_path)
    with pytest.raises(cli.UsageError, match=r"--data: unknown dataset\(s\) \['', 'x'\]; expected meld, emorynlp"):
        data.datasets_for("meld,,x")


def test_missing_files(tmp_path, monkeypatch):
    with pytest.raises(cli.MissingError, match=r"emorynlp_dev_final.csv: not found"):
        data.load_split("emorynlp", "dev", tmp_path)

    def offline(url, timeout):
        raise OSError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(cli.MissingError, match=r"dev_sent_emo.csv: not found, and the download failed \(no network\)"):
        data.load_split("meld", "dev", tmp_path)
    assert not (tmp_path / "meld").exists()


def _write_meld(folder: Path) -> None:
    """Three tiny MELD splits: two dialogues of two utterances each."""
    (folder / "meld").mkdir(parents=True)
    for split in data.SPLITS:
        rows = [f"{i},Hello there number {i}.,Ross,{'joy' if i % 2 else 'anger'},neutral,{i // 2},{i % 2}\n"
                for i in range(4)]
        (folder / "meld" / f"{split}_sent_emo.csv").write_text(MELD_HEADER + "".join(rows))


def test_cli_flags_and_stats(tmp_path, capsys, shared_models):
    with pytest.raises(SystemExit) as exit_:
        data.main(["--stats", "--window", "-1"])
    assert exit_.value.code == 2 and "expected an integer >= 0, got '-1'" in capsys.readouterr().err
    with pytest.raises(cli.UsageError, match=r"--data: unknown dataset\(s\) \['friends'\]"):  # before any tokenizer
        data.main(["--stats", "--data", "friends", "--model", str(tmp_path / "no-model")])
    with pytest.raises(SystemExit) as exit_:
        data.main([])
    assert exit_.value.code == 2 and "nothing to do" in capsys.readouterr().err
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    shutil.copy(shared_models / "llama2-tokenizer/tokenizer.model", model / "tokenizer.model")
    _write_meld(tmp_path / "data")
    assert data.main(["--stats", "--data-dir", str(tmp_path / "data"), "--model", str(model), "--window", "1"]) == 0
    out = capsys.readouterr().out
    assert "meld dev: 2 dialogues, 4 utterances, 0 with description" in out and "{'anger': 2, 'joy': 2}" in out


def test_cli_one_line_errors(tmp_path, data_dir):
    """Run as a script, a user error is one line on stderr and exit status 2 (usage) or 1 (a bad file)."""
    def run(*args):
        return subprocess.run([sys.executable, "data.py", *args], cwd=Path(data.__file__).parent,
                              capture_output=True, text=True)
    done = run("--stats", "--data", "friends")
    assert done.returncode == 2 and done.stderr == ("data.py: error: --data: unknown dataset(s) ['friends']; "
                                                    "expected meld, emorynlp, iemocap, a comma list of them, or all\n")
    src = tmp_path / "bad.json"
    src.write_text("{")
    done = run("--convert-descriptions", str(src), str(tmp_path / "out.jsonl"))
    assert done.returncode == 1 and done.stderr.startswith(f"data.py: error: {src}: not valid JSON")
    out = tmp_path / "d.jsonl"
    done = run("--convert-descriptions", str(data_dir / "meld_video_descriptions/sorted_annotations.json"), str(out))
    assert done.returncode == 0 and done.stdout == f"wrote 191 descriptions to {out}\n"


def test_csv_rows_multiline(tmp_path):
    """cli.csv_rows: a quoted line break is an unclosed quote unless multiline=True (a user's conversations CSV)."""
    path = tmp_path / "talk.csv"
    path.write_text('id,text\n1,"Hi.\nHow are you?"\n2,Fine.\n')
    with pytest.raises(cli.UserError, match=r"talk.csv:2: a field holds a line break \(an unclosed quote\?\) up to "
                                            r"line 3"):
        list(cli.csv_rows(path, ["id", "text"], ("id",)))
    rows = list(cli.csv_rows(path, ["id", "text"], ("id",), multiline=True))
    assert rows == [(f"{path}:2", {"id": 1, "text": "Hi.\nHow are you?"}), (f"{path}:4", {"id": 2, "text": "Fine."})]
    with pytest.raises(cli.UserError, match=r"talk.csv:4: row has fewer than 2 fields"):
        path.write_text('id,text\n1,"Hi.\nHow are you?"\n2\n')
        list(cli.csv_rows(path, ["id", "text"], multiline=True))


def test_tests_run_offline_so_missing_meld_is_an_error_not_a_download(tmp_path):
    """conftest.isolated_environment: a data folder without meld/ raises MissingError (the download is refused by
    the closed proxy) and writes nothing, instead of fetching MELD from the internet into the data folder."""
    with pytest.raises(cli.MissingError, match="the download failed"):
        data.load_split("meld", "dev", tmp_path)
    assert list(tmp_path.iterdir()) == []
