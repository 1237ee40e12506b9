"""ERC datasets (MELD, EmoryNLP, IEMOCAP) and the DialogueLLM instruction template.

Each utterance becomes one instruction (Zhang et al. 2023, arXiv 2310.11374, Sec. 3): the previous
`window` utterances as context, an optional video description, the target utterance, the candidate
labels. Reading and checking the dataset files is convert.py's; labelling your own conversations,
label.py's."""
import functools
import sys

import cli
import convert
from convert import SPLITS, fix_text, load_descriptions, resolve_data_dir  # noqa: F401 (used as data.*)

DATASETS = ("meld", "emorynlp", "iemocap")
LABELS = {"meld": ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"],
          "emorynlp": ["neutral", "joyful", "peaceful", "powerful", "scared", "mad", "sad"],
          # 6-class ERC setting (COSMIC, DAG-ERC, InstructERC): excited is kept, NOT merged into happy.
          "iemocap": ["happy", "sad", "neutral", "angry", "excited", "frustrated"]}
RESPONSE = "### Response:\n"
WINDOW = 2  # previous utterances in the context (the paper found 1-2 best)
MAX_LEN = 256  # prompt + answer tokens (the authors' scripts)

def load_split(dataset: str, split: str, data_dir=None) -> list[list[dict]]:
    """The dialogues of one split (convert.read_split); UsageError for an unknown dataset or split.
    Missing MELD CSVs are downloaded."""
    cli.check_names("--data", [dataset], DATASETS)
    cli.check_names("--split", [split], SPLITS)
    return convert.read_split(dataset, split, data_dir, LABELS[dataset])

def datasets_for(name: str, data_dir=None) -> list[str]:
    """The datasets of a --data value (UsageError for an unknown name); "all": those whose files exist."""
    return convert.datasets_for(name, data_dir, DATASETS)

def utterance_key(u: dict, split: str | None = None) -> tuple:
    """(dataset, split, dialogue_id, utterance_id): how a description names its utterance. `split` for
    a record that holds none (eval's rows: one split)."""
    return (u["dataset"], split or u["split"], u["dialogue_id"], u["utterance_id"])

def make_prompt(context: list[dict], target: dict, labels: list[str], description: str | None = None) -> str:
    """The instruction (Alpaca-style sections), ending with RESPONSE; the answer is the label word, then
    EOS."""
    task = "Name the emotion of the Input utterance. Answer with one label only."
    parts = [f"{task}\nLabels: {', '.join(labels)}\n"]
    if context:
        parts.append("### Context:\n" + "".join(f"{u['speaker']}: {u['text']}\n" for u in context))
    if description:
        parts.append(f"### Video:\n{description}\n")
    parts.append(f"### Input:\n{target['speaker']}: {target['text']}\n{RESPONSE}")
    return "".join(parts)

def prompt_of(example: dict, dropped: int = 0) -> str:
    """An example's instruction, without its `dropped` oldest context utterances."""
    context = example["context"][dropped:]
    return make_prompt(context, example["target"], example["labels"], example["description"])

def build_examples(dialogues: list[list[dict]], window: int, descriptions: dict | None = None) -> list[dict]:
    """One example per utterance: its parts (the `window` >= 0 previous utterances as context, the target
    utterance, the labels, a description or None; prompt_of writes them out) and the fields evaluation
    reports."""
    if window < 0:
        raise cli.UserError(f"window (previous utterances in the context) must be >= 0, got {window}")
    out = []
    for dialogue in dialogues:
        for i, u in enumerate(dialogue):
            desc = (descriptions or {}).get(utterance_key(u))
            out.append(dict(context=dialogue[max(0, i - window):i], target=u, labels=LABELS[u["dataset"]],
                            description=desc, has_description=desc is not None, label=u["label"],
                            dataset=u["dataset"], dialogue_id=u["dialogue_id"], utterance_id=u["utterance_id"]))
    return out

def label_token_ids(tok, labels: list[str]) -> dict[str, list[int]]:
    """Each label's token ids after the prompt: encode(RESPONSE + label) minus encode(RESPONSE)
    (SentencePiece gives "neutral" alone as "▁neutral", after "\\n" as "neut", "ral"); UserError if the
    prefix tokens change. Encoded once per (tokenizer, label set): encode_example asks for every example."""
    return {label: list(ids) for label, ids in _label_token_ids(tok, tuple(labels))}

@functools.lru_cache(maxsize=16)
def _label_token_ids(tok, labels: tuple[str, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    prefix = tok.encode(RESPONSE)
    out = []
    for label in labels:
        ids = tok.encode(RESPONSE + label)
        if ids[:len(prefix)] != prefix or len(ids) == len(prefix):
            raise cli.UserError(f"label {label!r}: encoding {RESPONSE!r} + label does not extend its encoding")
        out.append((label, tuple(ids[len(prefix):])))
    return tuple(out)

def encode_example(tok, example: dict, max_len: int) -> tuple[list[int], int]:
    """(BOS + prompt + label + EOS token ids, n_answer: the last ids, where the loss goes), len <= max_len.
    Context utterances go oldest first until the prompt fits beside the longest label of the set (not the
    gold one, so the prompt, in training as in evaluation, never depends on the answer); UserError if it
    does not fit even without context."""
    ids = label_token_ids(tok, example["labels"])
    answer = ids[example["label"]] + [tok.eos_id]
    room = 1 + max(len(label_ids) for label_ids in ids.values())  # the longest answer, EOS included
    for dropped in range(len(example["context"]) + 1):  # the `dropped` oldest context utterances go
        prompt_ids = tok.encode(prompt_of(example, dropped), bos=True)
        if len(prompt_ids) + room <= max_len:
            return prompt_ids + answer, len(answer)
    where = f"{example['dataset']} dialogue {example['dialogue_id']} utterance {example['utterance_id']}"
    raise cli.UserError(f"{where}: {len(prompt_ids)} prompt + {room} answer tokens (the longest label) "
                        f"without context > max_len {max_len}")

def token_counts(tok, dialogues: list[list[dict]], window: int, descriptions=None) -> list[tuple]:
    """(example, prompt + answer tokens, untruncated) per utterance: what `python data.py --stats`
    counts."""
    examples = build_examples(dialogues, window, descriptions)
    return [(e, len(encode_example(tok, e, max_len=sys.maxsize)[0])) for e in examples]

def main(argv=None) -> int:
    """`python data.py --stats` / `--convert-descriptions SRC OUT`: convert.py reads the files."""
    return convert.data_main(argv, __doc__.splitlines()[0], WINDOW, LABELS, token_counts)

if __name__ == "__main__":
    cli.run(main)
