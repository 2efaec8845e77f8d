import json
import random

import pytest

from r1x.model.tokenizer import DEFAULT_SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, load_tokenizer

from conftest import SESSION_SEED


def random_text(rng, n):
    # ASCII, Latin-1, CJK, emoji (astral plane), combining marks, control characters
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x300, 0x36F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_byte_round_trip_random_unicode():
    rng = random.Random(SESSION_SEED)
    tok = ByteTokenizer()
    for n in [0, 1, 3, 17, 200]:
        for _ in range(5):
            s = random_text(rng, n)
            ids = tok.encode(s)
            assert ids == list(s.encode("utf-8"))
            assert all(0 <= i < 256 for i in ids)
            assert tok.decode(ids) == s


def test_byte_special_tokens():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + len(DEFAULT_SPECIAL_TOKENS) == len(tok)
    ids = {t: tok.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS}
    assert sorted(ids.values()) == list(range(256, tok.vocab_size))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (ids["<pad>"], ids["<bos>"], ids["<eos>"])

    text = "<think>2+2 é</think><answer>4</answer>"
    enc = tok.encode(text, add_bos=True, add_eos=True)
    assert enc == ([tok.bos_token_id, ids["<think>"]] + list("2+2 é".encode()) + [ids["</think>"], ids["<answer>"]]
                   + list(b"4") + [ids["</answer>"], tok.eos_token_id])
    assert tok.decode(enc) == "<bos>" + text + "<eos>"
    assert tok.decode(enc, skip_special_tokens=True) == "2+2 é4"
    # plain bytes when special parsing is off; partial tags stay bytes
    assert tok.encode("<think>", parse_special=False) == list(b"<think>")
    assert tok.encode("<thin</answer") == list(b"<thin</answer")
    assert tok.special_token_ids == list(range(256, tok.vocab_size))


def test_byte_decode_invalid_utf8_and_bad_ids():
    tok = ByteTokenizer()
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # truncated 3-byte sequence
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    # a special token between two halves of a character does not glue them back together
    e = list("é".encode())
    assert tok.decode([e[0], tok.eos_token_id, e[1]]) == "\ufffd<eos>\ufffd"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_byte_save_load(tmp_path):
    tok = ByteTokenizer(list(DEFAULT_SPECIAL_TOKENS) + ["<tool>"])
    f = tok.save(tmp_path)
    assert f.endswith("r1x_byte_tokenizer.json")
    for loaded in (ByteTokenizer.load(tmp_path), ByteTokenizer.load(f), load_tokenizer(tmp_path), load_tokenizer(f)):
        assert isinstance(loaded, ByteTokenizer)
        assert loaded.special_tokens == tok.special_tokens
        assert loaded.encode("a<tool>b") == tok.encode("a<tool>b") == [97, 263, 98]
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    with pytest.raises(ValueError, match="duplicate"):
        ByteTokenizer(["<a>", "<a>"])


def _train_hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = ["the answer is 42", "think step by step", "what is two plus two? four", "the quick brown fox"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def test_hf_tokenizer(tmp_path):
    raw = _train_hf_tokenizer()
    path = tmp_path / "tokenizer.json"
    raw.save(str(path))
    for tok in (HFTokenizer.from_file(path), load_tokenizer(path), load_tokenizer(tmp_path)):
        assert isinstance(tok, HFTokenizer)
        assert tok.vocab_size == raw.get_vocab_size()
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        text = "<think>the answer is 42</think><answer>42</answer>"
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and ids[1] == tok.token_to_id("<think>")
        assert tok.token_to_id("</answer>") in ids
        assert len(ids) < len(text)  # merges learned
        assert tok.decode(ids, skip_special_tokens=True) == "the answer is 4242"
        assert tok.decode(ids) == "<bos>" + text + "<eos>"
        assert set(tok.special_token_ids) == set(range(7))
        rng = random.Random(SESSION_SEED)
        for _ in range(10):
            s = random_text(rng, 30)
            assert tok.decode(tok.encode(s)) == s
    out = HFTokenizer.from_file(path).save(tmp_path / "copy")
    assert load_tokenizer(out).encode("the fox") == tok.encode("the fox")


def test_hf_tokenizer_config_names_tokens(tmp_path):
    raw = _train_hf_tokenizer()
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<think>"}, "eos_token": "</answer>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id == raw.token_to_id("<think>") and tok.eos_token_id == raw.token_to_id("</answer>")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        HFTokenizer(raw, bos_token="<nope>")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
