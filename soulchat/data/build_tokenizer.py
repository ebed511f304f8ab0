"""Build the tiny byte-level BPE tokenizer bundled with soulchat (soulchat/assets/tokenizer/).

    python -m soulchat.data.build_tokenizer [--corpus PATH] [--vocab-size N] [--out DIR]

It exists so that tests, examples and small from-scratch models run offline with a tokenizer that
knows the corpus languages (Chinese and English). Design choices:

- Byte-level BPE over all 256 byte symbols: any text round-trips exactly, whatever it contains.
- Every Han character is its own pre-token, so BPE never merges across characters (no multi-character
  words) and the vocabulary budget goes to whole characters first: 3 UTF-8 bytes -> 1 token. The
  trainer reaches frequent characters on its own; any Han character of the corpus it did not reach
  is appended afterwards with the merges that join its bytes, so every character of the corpus is one
  token. The rarest trained merges give way to make room, so the final size stays <= --vocab-size.
- No normalizer: text is tokenized as given, so decode(encode(text)) == text.
- Special tokens: <|endoftext|> (padding, and end of text for a base model), <|im_start|> and
  <|im_end|> (ChatML turns; <|im_end|> is the eos of the chat format), ids 0, 1, 2.
- The same input gives byte-identical files (training is deterministic and the config is written
  with sorted keys), so the bundled files can be checked against a rebuild.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CORPUS = ASSETS / "sample_corpus.json"
DEFAULT_OUT = ASSETS / "tokenizer"
DEFAULT_VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 2048

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_TOKEN, IM_START, IM_END = SPECIAL_TOKENS

# ChatML. Only system/user/assistant are accepted (anything else raises while rendering, instead of
# silently producing a turn the model never saw). The {% generation %} block marks the assistant text
# plus its <|im_end|>, so apply_chat_template(..., return_assistant_tokens_mask=True) returns exactly
# the tokens a counselor model is trained on; it renders nothing by itself.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('chat roles must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Role headers of the two chat layouts the project renders (ChatML and the paper's format),
# fed to the trainer once per turn so they become cheap tokens.
_HEADERS = {
    "system": ("system\n",),
    "client": ("user\n", "用户："),
    "counselor": ("assistant\n", "心理咨询师："),
}
# CJK unified ideographs (+ extension A, compatibility ideographs, extensions B..H), as real characters
# so Python's re and the tokenizers (Oniguruma) regex read the same class.
HAN_CLASS = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]"
_HAN = re.compile(HAN_CLASS)


def conversation_texts(corpus: str | Path) -> Iterator[str]:
    """Training text of a corpus in any format soulchat.data.readers understands: each turn's
    text preceded by its role header."""
    from soulchat.data.readers import read_conversations  # the readers are only needed for files

    for conv in read_conversations(corpus, fmt="auto", on_error="raise"):
        for turn in conv.turns:
            for header in _HEADERS[turn.role]:
                yield header
            yield turn.text


def _new_tokenizer(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Han characters first become single pre-tokens; the rest gets the GPT-2 style split.
            pre_tokenizers.Split(Regex(HAN_CLASS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _bpe_pieces(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one pre-token: repeatedly join the adjacent pair with the lowest merge rank."""
    while len(symbols) > 1:
        known = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not known:
            break
        _, i = min(known)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _with_characters(
    base: dict[str, int], trained: list[tuple[str, str]], k: int, char_bytes: list[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the first ``k`` trained merges, plus the merges that make every
    character (given as its byte-level symbol string) a single token.

    Ids follow the trainer's rule (a merge result gets the next id unless already known), so for
    k = len(trained) this reproduces the trainer's own vocabulary. Appended merges rank after all
    trained ones, so the trained tokenization of everything else is unchanged. A character that
    still splits into pieces p0 p1 [p2 ...] has no merge joining adjacent pieces (BPE would have
    applied it), so joining them left to right adds only new merges.
    """
    vocab = dict(base)
    merges = trained[:k]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    ranks = {m: r for r, m in enumerate(merges)}
    for symbols in char_bytes:
        pieces = _bpe_pieces(list(symbols), ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks[(left, right)] = len(merges)
            merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    return vocab, merges


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on ``texts``; the result depends only on the texts and their order.

    The final vocabulary has at most ``vocab_size`` tokens whenever the byte alphabet, the special
    tokens and the corpus's Han characters fit in it (otherwise every character still gets its token
    and the vocabulary is larger). BPE training is greedy, so training to a smaller target gives a
    prefix of the same merge list: train once, then keep the longest prefix that leaves room for the
    characters the prefix does not reach (a binary search over the prefix length).
    """
    texts = list(texts)
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"--vocab-size {vocab_size} is too small: the byte alphabet and special tokens "
                         f"alone need {min_size}; use at least that (the default is {DEFAULT_VOCAB_SIZE})")
    tok = _new_tokenizer(models.BPE())
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols: nothing is ever unknown
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    spec = json.loads(tok.to_str())
    # tokenizers >= 0.20 stores merges as pairs, older versions as "left right" strings (byte-level
    # symbols never contain a space, so the old form is unambiguous).
    trained = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    base = {t: spec["model"]["vocab"][t] for t in [*SPECIAL_TOKENS, *alphabet]}
    if sorted(base.values()) != list(range(len(base))):
        raise RuntimeError("unexpected trainer layout: special tokens and bytes are not the first ids")
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    han = sorted({ch for text in texts for ch in _HAN.findall(text)})
    char_bytes = [to_bytes.pre_tokenize_str(ch)[0][0] for ch in han]
    if _with_characters(base, trained, len(trained), [])[0] != spec["model"]["vocab"]:
        raise RuntimeError("unexpected trainer layout: merge results are not numbered in merge order")

    def size(k: int) -> int:
        return len(_with_characters(base, trained, k, char_bytes)[0])

    lo, hi = 0, len(trained)  # size(lo) <= vocab_size < size(hi), unless the whole list fits
    if size(hi) <= vocab_size:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= vocab_size else (lo, mid)
    vocab, merges = _with_characters(base, trained, lo, char_bytes)

    spec["model"]["vocab"] = vocab
    as_pairs = not spec["model"]["merges"] or isinstance(spec["model"]["merges"][0], list)
    spec["model"]["merges"] = [list(m) if as_pairs else " ".join(m) for m in merges]
    tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # already ids 0..2 in the vocab; marks them special
    split = [ch for ch in han if len(tok.encode(ch, add_special_tokens=False).ids) != 1]
    if split:  # would mean the simulation above disagrees with the library's BPE
        raise RuntimeError(f"internal error: characters still split after adding merges: {split[:10]}")
    return tok


def tokenizer_config() -> dict:
    """The transformers side of the tokenizer (tokenizer_config.json), written by hand so the file is
    small, stable across transformers versions and byte-identical between builds."""
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        # (transformers 5 also reads "extra_special_tokens", but 4.x expects a dict under that key)
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
    }


def save(tok: Tokenizer, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    cfg = tokenizer_config()
    (out / "tokenizer_config.json").write_text(
        json.dumps(cfg, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return out


def build(corpus: str | Path = DEFAULT_CORPUS, vocab_size: int = DEFAULT_VOCAB_SIZE,
          out: str | Path = DEFAULT_OUT) -> Tokenizer:
    tok = train_tokenizer(list(conversation_texts(corpus)), vocab_size)
    save(tok, out)
    return tok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m soulchat.data.build_tokenizer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                   help="corpus file or directory (any format soulchat.data.readers supports)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="largest final vocabulary size (special tokens and the 256 bytes included)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    args = p.parse_args(argv)
    tok = build(args.corpus, args.vocab_size, args.out)
    files = sorted(Path(args.out).iterdir())
    size = sum(f.stat().st_size for f in files)
    print(f"vocab {tok.get_vocab_size()} (at most {args.vocab_size}); wrote {len(files)} files, "
          f"{size / 1024:.0f} KiB, to {args.out}")


if __name__ == "__main__":
    main()
