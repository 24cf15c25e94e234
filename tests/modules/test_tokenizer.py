"""SD 1.x / SD 2.x tokenizers: ids pinned against the reference CLIP tokenizer."""
import open_clip
import pytest
import torch

from ldm.modules.encoders.tokenizer import (BOS_ID, EOS_ID, sd1_tokenizer, token_count, tokenize_sd1,
                                            tokenize_sd2)

# ids of openai/clip-vit-large-patch14's tokenizer (no padding)
REFERENCE = [
    ("a photo of an astronaut riding a horse",
     [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]),
    ("A PHOTO, of John Jacob Jingleheimerschmidt!!",
     [49406, 320, 1125, 267, 539, 1742, 9222, 73, 22228, 10931, 517, 18463, 748, 49407]),
    ("café à l’aube ☕ 東京",
     [49406, 15304, 21259, 331, 728, 503, 627, 655, 26561, 48338, 21078, 361, 49407]),
    ("masterpiece, best quality, <lyco:beem_style_1.3-000003:1>",
     [49406, 12066, 267, 949, 3027, 267, 283, 1251, 1320, 281, 571, 2270, 318, 1844, 318, 272, 269,
      274, 268, 271, 271, 271, 271, 271, 274, 281, 272, 285, 49407]),
    ("emoji 😀👍🏽 test",
     [49406, 16327, 12832, 43722, 1628, 49407]),
    ("naïve résumé — “quotes” &amp; ﬁ",
     [49406, 1097, 35689, 563, 29106, 7054, 4166, 2005, 728, 506, 5808, 728, 507, 261, 6259, 282, 171,
      105, 479, 49407]),
]
LONG = "a photo of an astronaut riding a horse on the moon, " * 8  # 12 tokens * 8 = 96 > 75


@pytest.mark.parametrize("text,ids", REFERENCE, ids=[f"ref{i}" for i in range(len(REFERENCE))])
def test_sd1_matches_reference_and_pads_with_eos(text, ids):
    tokens = tokenize_sd1([text])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    assert tokens[0, :len(ids)].tolist() == ids
    assert (tokens[0, len(ids):] == EOS_ID).all()
    assert token_count(text) == len(ids) - 2


def test_sd1_batch_equals_single_texts():
    batch = tokenize_sd1([text for text, _ in REFERENCE])
    for row, (text, _) in zip(batch, REFERENCE):
        assert torch.equal(row, tokenize_sd1([text])[0])


def test_sd1_truncation_keeps_eos_last():
    full = sd1_tokenizer()(LONG)["input_ids"]  # unpadded, untruncated
    assert token_count(LONG) == len(full) - 2 == 96
    tokens = tokenize_sd1([LONG])[0]
    assert tokens.shape == (77,)
    assert tokens[0] == BOS_ID and tokens[76] == EOS_ID
    assert tokens[1:76].tolist() == full[1:76]
    short = tokenize_sd1([LONG], max_length=10)[0]
    assert short.tolist() == full[:9] + [EOS_ID]


def test_sd1_empty_string():
    assert tokenize_sd1([""])[0].tolist() == [BOS_ID] + [EOS_ID] * 76
    assert token_count("") == 0


def test_sd1_case_and_whitespace_do_not_matter():
    base = tokenize_sd1(["a photo of an astronaut"])
    assert torch.equal(tokenize_sd1(["A Photo OF an ASTRONAUT"]), base)
    assert torch.equal(tokenize_sd1(["a\tphoto\nof  an\r\n astronaut "]), base)


def test_sd1_tokenizer_is_built_once():
    assert sd1_tokenizer() is sd1_tokenizer()
    assert len(sd1_tokenizer()) == 49408


@pytest.mark.parametrize("tokenize", [tokenize_sd1, tokenize_sd2])
def test_bad_arguments_name_the_function(tokenize):
    with pytest.raises(TypeError, match=tokenize.__name__):
        tokenize("a single string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenize(["ok", None])
    with pytest.raises(ValueError, match="max_length"):
        tokenize(["ok"], max_length=1)


def test_sd2_equals_open_clip_and_pads_with_zero():
    texts = [text for text, _ in REFERENCE] + [LONG, ""]
    tokens = tokenize_sd2(texts)
    assert tokens.shape == (len(texts), 77) and tokens.dtype == torch.long
    assert torch.equal(tokens, open_clip.tokenize(texts))
    # plain prompt: same ids as SD 1.x, then zeros
    ids = REFERENCE[0][1]
    assert tokens[0, :len(ids)].tolist() == ids and (tokens[0, len(ids):] == 0).all()
    assert tokens[-1, :3].tolist() == [BOS_ID, EOS_ID, 0]
    assert tokens[-2, 0] == BOS_ID and tokens[-2, 76] == EOS_ID and (tokens[-2] != 0).all()


# --- long prompts: chunks of 75 tokens, each [BOS, ..., EOS] (AUTOMATIC1111, kohya --max_token_length) ---

def kohya_chunks(ids, chunks, pad_id):
    """kohya sd-scripts' rule (train_util get_input_ids), written out: the sequence tokenized
    to 75 x k + 2 ids; chunk i is BOS + ids[1 + 75i : 76 + 75i] + the last id; with a pad id
    other than EOS (SD 2.x), a chunk whose content fills it ends in EOS and a chunk starting
    with padding starts BOS, EOS."""
    out = []
    for i in range(1, 75 * chunks + 1, 75):
        chunk = [ids[0]] + ids[i:i + 75] + [ids[-1]]
        if pad_id != EOS_ID:
            if chunk[-2] not in (EOS_ID, pad_id):
                chunk[-1] = EOS_ID
            if chunk[1] == pad_id:
                chunk[1] = EOS_ID
        out += chunk
    return out


ALL_REFERENCE_TEXT = " ".join(text for text, _ in REFERENCE)
ALL_REFERENCE_CONTENT = [i for _, ids in REFERENCE for i in ids[1:-1]]  # words tokenize on their own


@pytest.mark.parametrize("max_length", [150, 225])
def test_sd1_long_prompt_chunks_against_reference_ids(max_length):
    text = ALL_REFERENCE_TEXT + " " + ALL_REFERENCE_TEXT  # 160 content tokens
    content = ALL_REFERENCE_CONTENT * 2
    assert token_count(text) == len(content) == 160
    ids = tokenize_sd1([text, ""], max_length=max_length)
    k = max_length // 75
    assert ids.shape == (2, 77 * k)
    expected = []
    for c in range(k):
        part = content[75 * c:75 * (c + 1)]
        expected += [BOS_ID] + part + [EOS_ID] * (76 - len(part))
    assert ids[0].tolist() == expected
    assert ids[1].tolist() == ([BOS_ID] + [EOS_ID] * 76) * k  # an empty caption: k empty chunks
    # the first chunk of a caption that fits is the usual 77 ids
    assert torch.equal(tokenize_sd1([REFERENCE[0][0]], 150)[0, :77], tokenize_sd1([REFERENCE[0][0]])[0])


@pytest.mark.parametrize("words", [0, 1, 9, 10, 18, 19, 37, 38])  # 4 tokens per word: ends inside, at, past a chunk
@pytest.mark.parametrize("tokenize,pad_id", [(tokenize_sd1, EOS_ID), (tokenize_sd2, 0)])
def test_long_prompt_chunks_follow_kohya(tokenize, pad_id, words):
    text = " ".join(["red cube, table"] * words)  # "red", "cube", ",", "table"
    for max_length in (150, 225):
        k = max_length // 75
        if tokenize is tokenize_sd1:  # one long sequence, as kohya tokenizes
            full = sd1_tokenizer()(text, padding="max_length", truncation=True, max_length=75 * k + 2)["input_ids"]
        else:
            full = open_clip.tokenize([text], context_length=75 * k + 2)[0].tolist()
        ids = tokenize([text], max_length=max_length)[0].tolist()
        assert ids == kohya_chunks(full, k, pad_id)
        for c in range(k):  # every chunk: BOS first; EOS last or right after the content
            chunk = ids[77 * c:77 * (c + 1)]
            assert chunk[0] == BOS_ID and EOS_ID in chunk[1:]
            assert all(t == pad_id for t in chunk[chunk.index(EOS_ID, 1) + 1:])


def test_sd2_long_prompt_is_open_clip_content_in_chunks():
    text = " ".join(["a photo of an astronaut riding a horse"] * 12)  # 96 tokens
    content = open_clip.tokenize([text], context_length=200)[0].tolist()[1:97]
    ids = tokenize_sd2([text], max_length=150)[0].tolist()
    assert ids[:77] == [BOS_ID] + content[:75] + [EOS_ID]
    assert ids[77:] == [BOS_ID] + content[75:] + [EOS_ID] + [0] * 54


@pytest.mark.parametrize("max_length", [78, 100, 151, 76.5])
@pytest.mark.parametrize("tokenize", [tokenize_sd1, tokenize_sd2])
def test_max_length_is_one_sequence_or_whole_chunks(tokenize, max_length):
    with pytest.raises(ValueError, match="max_length"):
        tokenize(["ok"], max_length=max_length)
