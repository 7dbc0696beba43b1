"""Train the demo model's byte-level BPE tokenizer (8192 tokens) on the training corpus.

Each domain contributes the same number of characters, so no domain's script or syntax hogs
the merges. Saved in transformers format (PreTrainedTokenizerFast) with eos/pad tokens and a
small chat template, so `AutoTokenizer.from_pretrained(out)` works offline.

    RAYON_NUM_THREADS=1 python tools/train_tokenizer.py --corpus /work/scratch/corpus --out models/tiny-moe
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DOMAINS = ["python", "c", "math", "sql", "english", "german", "spanish", "unix"]
EOS, PAD = "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def balanced_texts(corpus: Path, chars_per_domain: int):
    """Yield training passages, the same character budget from every domain (file order = seeded)."""
    for d in DOMAINS:
        used = 0
        with open(corpus / d / "train.jsonl", encoding="utf-8") as f:
            for line in f:
                t = json.loads(line)["text"]
                yield t
                used += len(t)
                if used >= chars_per_domain:
                    break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("/work/scratch/corpus"))
    ap.add_argument("--out", type=Path, default=Path("models/tiny-moe"))
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--chars-per-domain", type=int, default=600_000)
    args = ap.parse_args()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab, min_frequency=2, show_progress=True,
        special_tokens=[EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(balanced_texts(args.corpus, args.chars_per_domain), trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        additional_special_tokens=ROLE_TOKENS, model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(args.out)
    print(f"vocab {len(fast)} -> {args.out}")


if __name__ == "__main__":
    main()
