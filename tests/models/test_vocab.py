"""Row alignment across vocabularies (chat-vector case: a target with extra Korean tokens, in another order)."""

from __future__ import annotations

import string

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.models.tiny import SPECIAL_TOKENS, char_tokenizer
from evomerge.models.vocab import (
    EMBEDDING_POLICIES,
    align_rows,
    align_vocab,
    check_policy,
    embedding_report,
    vocab_index_map,
)

ENGLISH = string.ascii_lowercase + string.digits + " .?"
KOREAN = "가나다라마바사아자차카타파하정답"
# the target: a superset of the source, Korean characters first and the English ones reversed
TARGET = KOREAN[:8] + ENGLISH[::-1] + KOREAN[8:]


@pytest.fixture(scope="module")
def toks():
    return char_tokenizer(TARGET), char_tokenizer(ENGLISH)


def test_index_map_places_every_shared_token(toks):
    target, source = toks
    m = vocab_index_map(target, source)
    assert m.dtype == torch.long and m.shape == (len(target),)
    t_vocab, s_vocab = target.get_vocab(), source.get_vocab()
    for token, t_id in t_vocab.items():
        expected = s_vocab.get(token, -1)
        assert m[t_id].item() == expected, token
    assert int((m >= 0).sum()) == len(SPECIAL_TOKENS) + len(ENGLISH)
    assert int((m < 0).sum()) == len(KOREAN)
    # spot checks by hand: the first Korean char has no source row; 'a' is the source's first letter
    assert m[target.convert_tokens_to_ids("가")].item() == -1
    assert m[target.convert_tokens_to_ids("a")].item() == len(SPECIAL_TOKENS)
    assert m[target.convert_tokens_to_ids("?")].item() == len(SPECIAL_TOKENS) + len(ENGLISH) - 1


def test_align_rows_exact_placement(toks):
    target, source = toks
    m = vocab_index_map(target, source)
    hidden = 5
    source_rows = torch.arange(len(source) * hidden, dtype=torch.float32).view(len(source), hidden)
    fill = -torch.ones(len(target), hidden, dtype=torch.bfloat16)
    out = align_rows(source_rows, m, fill)
    assert out.shape == fill.shape and out.dtype == torch.bfloat16
    for ch in ENGLISH:
        assert torch.equal(out[target.convert_tokens_to_ids(ch)],
                           source_rows[source.convert_tokens_to_ids(ch)].to(torch.bfloat16)), ch
    for ch in KOREAN:
        assert torch.equal(out[target.convert_tokens_to_ids(ch)], fill[0]), ch
    for sp in SPECIAL_TOKENS:
        assert torch.equal(out[target.convert_tokens_to_ids(sp)],
                           source_rows[source.convert_tokens_to_ids(sp)].to(torch.bfloat16))
    assert torch.equal(fill, -torch.ones_like(fill))  # the fill itself is not modified


def test_padded_embeddings_and_a_smaller_source_never_crash(toks):
    target, source = toks
    n_t, n_s = len(target), len(source)
    m = vocab_index_map(target, source, num_rows=n_t + 6, source_rows=n_s - 3)  # padded target, cut source
    assert m.shape == (n_t + 6,) and (m[n_t:] == -1).all()
    assert (m < n_s - 3).all()
    fill = torch.zeros(n_t + 6, 4)
    src = torch.randn(n_s - 3, 4)
    out = align_rows(src, m, fill)
    assert (out[n_t:] == 0).all()
    last = source.convert_tokens_to_ids("?")  # id n_s - 1: beyond the cut source, kept from the fill
    assert (out[target.convert_tokens_to_ids("?")] == 0).all() and last >= n_s - 3
    # a map longer than the fill, or shorter: extra entries ignored, extra fill rows kept
    assert align_rows(src, vocab_index_map(target, source), torch.zeros(n_t - 2, 4)).shape == (n_t - 2, 4)
    with pytest.raises(ValueError, match="width"):
        align_rows(torch.zeros(3, 5), m, fill)


def test_source_to_target_and_back_is_identity_on_shared_tokens(toks):
    target, source = toks
    rows = torch.randn(len(source), 3)
    into_target = align_rows(rows, vocab_index_map(target, source), torch.zeros(len(target), 3))
    back = align_rows(into_target, vocab_index_map(source, target), torch.full((len(source), 3), 9.0))
    assert torch.equal(back, rows)  # every source token exists in the superset target


def test_alignment_report_and_policies(toks):
    target, source = toks
    al = align_vocab(target, {"en-chat": source}, num_rows=len(target) + 2)["en-chat"]
    assert al.matched == len(SPECIAL_TOKENS) + len(ENGLISH)
    assert al.kept == len(KOREAN) + 2
    assert f"{al.matched} of {len(target)} target tokens matched" in al.report()
    text = embedding_report("align", "ko-cp", {"en-chat": al})
    assert "ko-cp" in text and "en-chat" in text and f"{al.kept} row(s) kept" in text
    keep = embedding_report("keep_target", "ko-cp", vocab_sizes={"ko-cp": len(target), "en-chat": len(source)})
    assert "not merged" in keep and str(len(target)) in keep
    assert EMBEDDING_POLICIES == ("keep_target", "align")
    assert check_policy("align") == "align"
    with pytest.raises(ConfigError, match="keep_target, align") as e:
        check_policy("concat", file="space.yaml")
    assert "space.yaml" in str(e.value) and "concat" in str(e.value)
