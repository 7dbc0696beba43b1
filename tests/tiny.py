"""Tiny random models of every supported family, built in the tests (no hub, no downloads).

Routers are re-initialised with large random weights (and random correction biases) so that
routing is diverse and ties are impossible; everything runs in fp32 on the CPU.
"""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig,
                          Qwen2MoeConfig, Qwen3MoeConfig)

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]
COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family: str, num_experts: int = 8, num_layers: int = 2, top_k: int = 2):
    common = dict(COMMON, num_experts_per_tok=top_k)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, num_hidden_layers=num_layers, intermediate_size=64, moe_intermediate_size=16,
                              num_experts=num_experts, norm_topk_prob=True)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**common, num_hidden_layers=num_layers, intermediate_size=64, moe_intermediate_size=16,
                              shared_expert_intermediate_size=24, num_experts=num_experts, norm_topk_prob=False)
    if family == "mixtral":
        return MixtralConfig(**common, num_hidden_layers=num_layers, intermediate_size=16,
                             num_local_experts=num_experts)
    if family == "olmoe":
        return OlmoeConfig(**common, num_hidden_layers=num_layers, intermediate_size=16, num_experts=num_experts,
                           norm_topk_prob=False)
    if family == "deepseek_v3":
        common = {k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads")}
        return DeepseekV3Config(**common, num_key_value_heads=4, num_hidden_layers=num_layers + 1, intermediate_size=64,
                                moe_intermediate_size=16, n_routed_experts=num_experts, n_shared_experts=1,
                                n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
                                norm_topk_prob=True)
    if family == "gpt_oss":
        return GptOssConfig(**common, num_hidden_layers=num_layers, intermediate_size=16,
                            num_local_experts=num_experts, layer_types=["full_attention"] * num_layers)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(family, **kw)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.normal_(0.0, 1.0)
            elif name.endswith("mlp.router.bias"):
                p.normal_(0.0, 0.5)
            elif p.dim() >= 2 and "experts" in name:
                p.normal_(0.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


def tokens(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, COMMON["vocab_size"], (batch, length), generator=g)


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_tokenizer():
    """Character-level tokenizer over printable ASCII (ids < 128, the tiny models' vocab), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(c): c - 28 for c in range(32, 127)}}
    vocab["\n"] = 99
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    out.chat_template = CHAT_TEMPLATE
    return out


def tiny_checkpoint(path, family: str = "qwen3_moe", seed: int = 0, **kw):
    """A tiny model and its tokenizer saved as an HF checkpoint folder (per-expert keys on disk)."""
    model = tiny_model(family, seed=seed, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# Made-up domains with clearly different text, for matching and serving tests.
DOMAINS = {
    "cooking": ["Whisk the eggs with sugar until pale, then fold in the flour.",
                "Simmer the tomato sauce for twenty minutes and season with basil.",
                "Roast the chicken at 200 degrees until the skin is golden and crisp.",
                "Knead the bread dough for ten minutes and let it rise for an hour.",
                "Chop the onions finely and fry them in butter until soft.",
                "Bake the cake for forty minutes and let it cool before icing it."],
    "python": ["def add(a, b):\n    return a + b",
               "import os\nfor name in os.listdir('.'):\n    print(name)",
               "class Stack:\n    def __init__(self):\n        self.items = []",
               "with open('data.txt') as f:\n    lines = f.readlines()",
               "try:\n    value = int(text)\nexcept ValueError:\n    value = 0",
               "squares = [x * x for x in range(10) if x % 2 == 0]"],
    "football": ["The striker scored twice in the second half to win the match.",
                 "The goalkeeper saved a penalty in the final minute of the game.",
                 "The referee showed a red card after a dangerous tackle in midfield.",
                 "The home team won the league after a draw on the last match day.",
                 "The coach changed the formation and brought on two new wingers.",
                 "A header from a corner kick equalised the score before half time."],
}
QUERIES = {"cooking": "Stir the soup and add salt and pepper before serving it hot.",
           "python": "def mean(values):\n    return sum(values) / len(values)",
           "football": "The midfielder passed to the forward who shot into the top corner."}
UNRELATED = "Quarterly revenue of the bank rose by three percent, the annual report to shareholders said."


def pool_and_store(root, model_dir, domains=("cooking", "python")):
    """An expert pool built from `model_dir` and a store with `domains` registered from DOMAINS, under `root`."""
    from domex.runtime.indexer import register
    from domex.runtime.pool import build
    from domex.store.demos import Demo

    build(model_dir, root / "pool", progress=False)
    for name in domains:
        register(root / "pool", root / "store", name, [Demo.from_json({"text": t}) for t in DOMAINS[name]], progress=False)
    return root / "pool", root / "store"
