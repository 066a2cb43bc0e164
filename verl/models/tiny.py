"""A tiny Qwen2-architecture model and tokenizer that the project builds itself.

No model hub is reachable in CI, so tests and the embedded default run use a model built here: a Qwen2 causal LM of
about a million parameters and a byte-level BPE tokenizer (digits split one per token, so arithmetic tokenises
sensibly) trained on the built-in tasks' text plus a small English/math corpus. The output is an ordinary Hugging
Face directory (``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` with a ChatML chat template) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load.

Special tokens follow Qwen: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos). A build is a pure
function of the arguments: the same seed gives the same ``model.safetensors`` and ``tokenizer.json`` bytes.

Usage::

    python -m verl.models.tiny --out /tmp/tiny [--seed 0] [--variant causal_lm|value|reward]

    from verl.models.tiny import get_tiny_model_path
    path = get_tiny_model_path()          # built once into $VERL_TINY_MODEL_CACHE (default ~/.cache/verl/tiny)

``build_tiny_mixtral`` builds a tiny ``MixtralForCausalLM`` (mixture of experts) with the same tokenizer.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

VARIANTS = ("causal_lm", "value", "reward")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_TOKEN, IM_START, EOS_TOKEN = SPECIAL_TOKENS
CACHE_ENV = "VERL_TINY_MODEL_CACHE"

# ChatML, as Qwen2 instruct models use it; no default system prompt (it would only lengthen a tiny model's prompts).
# Tools are listed in the system turn and tool results come back as user turns, so multi-turn tool tests can run.
# (transformers renders with trim_blocks, which eats a newline right after a block tag: hence the {{ '\n' }}.)
CHAT_TEMPLATE = ("{% if tools %}"
                 "<|im_start|>system\n"
                 "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
                 "You can call these tools. Reply with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>."
                 "\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools><|im_end|>\n"
                 "{% endif %}"
                 "{% for message in messages %}"
                 "{% if message['role'] == 'system' and tools and loop.first %}"
                 "{% elif message['role'] == 'tool' %}"
                 "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
                 "{% else %}"
                 "<|im_start|>{{ message['role'] }}\n{{ message['content'] if message['content'] is string else '' }}"
                 "{% if message['role'] == 'assistant' and message.get('tool_calls') %}"
                 "{% for call in message['tool_calls'] %}"
                 "{% set fn = call['function'] if call.get('function') else call %}"
                 "{{ '\\n' }}<tool_call>{\"name\": \"{{ fn['name'] }}\", \"arguments\": "
                 "{% if fn['arguments'] is string %}{{ fn['arguments'] }}{% else %}{{ fn['arguments'] | tojson }}"
                 "{% endif %}}</tool_call>"
                 "{% endfor %}"
                 "{% endif %}"
                 "<|im_end|>\n"
                 "{% endif %}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# A small hand-written corpus so that ordinary English, word problems and LaTeX tokenise into sensible pieces.
_CORPUS = """\
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May?
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?
Betty is saving money for a new wallet which costs $100. She has only half of the money she needs.
A train travels 60 miles per hour for 3 hours. How far does it travel in total?
There are 15 apples in a basket. Tom takes 4 apples and Mary takes 3 apples. How many apples are left?
A rectangle has a length of 8 centimeters and a width of 5 centimeters. What is its area?
The store sells pencils in packs of 12. If a teacher buys 7 packs, how many pencils does she have?
John reads 20 pages every day. How many days will it take him to read a book with 240 pages?
Each box holds 6 eggs. The farmer collected 75 eggs today. How many boxes can he fill?
Let's think step by step. First, we compute the total. Then we subtract what was used.
So the answer is 72. Therefore, the final answer is 10 dollars.
She sold 48 / 2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips.
The sum of two numbers is 25 and their difference is 7. Find the larger number.
If x + 3 = 10, then x = 7. If 2x = 18, then x = 9.
Find the value of $x$ such that $3x - 5 = 16$. The solution is $x = 7$, so the answer is $\\boxed{7}$.
Compute $\\frac{1}{2} + \\frac{1}{3}$. We get $\\frac{5}{6}$, so the answer is $\\boxed{\\frac{5}{6}}$.
What is the remainder when 100 is divided by 7? Since 7 times 14 is 98, the remainder is $\\boxed{2}$.
Let $f(x) = x^2 + 2x + 1$. Then $f(3) = 16$ and $f(x) = (x + 1)^2$.
The probability of rolling an even number on a fair die is $\\frac{1}{2}$.
A circle with radius $r$ has area $\\pi r^2$ and circumference $2 \\pi r$.
The square root of 144 is 12, and 5 squared is 25.
The user asks a question and the assistant answers it. The assistant is helpful, honest and brief.
You are a helpful assistant. Please reason step by step, and put your final answer within the box.
Hello! How can I help you today? Thank you, that is correct. Sorry, that is not right; try again.
The weather is sunny today, and the children are playing in the park with their friends.
We use the numbers to make an equation. Each number is used exactly once.
The result of the calculation is shown below. Check the answer before you write it.
"""


def corpus_texts(seed: int = 0) -> Iterator[str]:
    """Tokenizer training text: the built-in corpus plus prompts and answers of the generated tasks."""
    from verl.utils.dataset.tasks import GSM8K_INSTRUCTION, MATH_INSTRUCTION, task_texts

    yield from _CORPUS.splitlines()
    yield GSM8K_INSTRUCTION
    yield MATH_INSTRUCTION
    for _ in range(8):  # role names right after <|im_start|> should be whole tokens
        yield from ("system\n", "user\n", "assistant\n", "tool\n")
    yield from task_texts(seed=seed)


def build_tokenizer(seed: int = 0, vocab_size: int = 2048, model_max_length: int = 2048) -> Any:
    """Train the byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    ``vocab_size`` is a budget: on the small corpus BPE runs out of frequent pairs at about 600 tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Qwen2's own normalizer and pre-tokenizer (its split regex isolates every digit), so that whichever class
    # loads the directory (transformers 5 rebuilds Qwen2Tokenizer from vocab and merges; 4.x reads tokenizer.json)
    # the text splits the same way.
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  min_frequency=2,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(corpus_texts(seed)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok,
                                   eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN,
                                   additional_special_tokens=[IM_START],
                                   chat_template=CHAT_TEMPLATE,
                                   model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def _save_tokenizer(tokenizer: Any, out_dir: str, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that transformers 4.x and 5.x both load.

    The config is written by hand (rather than by ``save_pretrained``, whose layout differs between versions) in
    the shape Qwen2 checkpoints use, with the chat template inline, which every transformers version reads.
    """
    tokenizer.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    added = {
        str(vocab[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True
        } for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "errors": "replace",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "split_special_tokens": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    special_map = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": [IM_START]}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2)
        f.write("\n")


def build_tiny_model(out_dir: str,
                     seed: int = 0,
                     variant: str = "causal_lm",
                     hidden_size: int = 128,
                     num_hidden_layers: int = 4,
                     num_attention_heads: int = 4,
                     num_key_value_heads: int = 2,
                     intermediate_size: int = 512,
                     max_position_embeddings: int = 2048,
                     vocab_size: int = 2048,
                     tie_word_embeddings: bool = False,
                     **config_overrides: Any) -> str:
    """Build the tiny model and tokenizer into ``out_dir`` (created if needed) and return its absolute path.

    ``variant``: ``causal_lm`` (actor / reference), ``value`` (token classification with one label, as a critic
    loads it) or ``reward`` (sequence classification with one label). The model's vocabulary is the tokenizer's
    rounded up to a multiple of 64, as real checkpoints pad it. ``config_overrides`` go to ``Qwen2Config``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny model variant {variant!r}; choose one of {list(VARIANTS)}")
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                              Qwen2Config)

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed, vocab_size=vocab_size, model_max_length=max_position_embeddings)
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([PAD_TOKEN, EOS_TOKEN])

    config_kwargs = dict(vocab_size=(len(tokenizer) + 63) // 64 * 64,
                         hidden_size=hidden_size,
                         intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads,
                         max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=pad_id,
                         eos_token_id=eos_id,
                         pad_token_id=pad_id,
                         use_sliding_window=False,
                         max_window_layers=num_hidden_layers)
    if variant != "causal_lm":
        config_kwargs["num_labels"] = 1
    config_kwargs.update(config_overrides)
    config = Qwen2Config(**config_kwargs)
    auto_cls = {
        "causal_lm": AutoModelForCausalLM,
        "value": AutoModelForTokenClassification,
        "reward": AutoModelForSequenceClassification,
    }[variant]
    # Seed every generator weight init may touch; fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_cls.from_config(config, dtype=torch.float32)
    model.eval()
    from transformers.utils import logging as hf_logging

    bars_were_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per build only clutters test logs
    # transformers writes only on rank 0 once torch.distributed is initialised; every rank builds its own private
    # copy here (then renamed into the shared cache), so each must write all of it
    model.should_save_on_this_rank = lambda is_main_process: True
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if not bars_were_disabled:
            hf_logging.enable_progress_bar()
    _save_generation_assets(out_dir, tokenizer, pad_id, eos_id, max_position_embeddings, variant == "causal_lm")
    return out_dir


def _save_generation_assets(out_dir: str, tokenizer: Any, pad_id: int, eos_id: int, max_position_embeddings: int,
                            generation_config: bool) -> None:
    """The tokenizer files, and for a causal LM the generation config (sampling by default; EOS or padding ends a
    sequence), that every tiny model directory carries next to its weights."""
    from transformers import GenerationConfig

    if generation_config:
        GenerationConfig(bos_token_id=pad_id,
                         eos_token_id=[eos_id, pad_id],
                         pad_token_id=pad_id,
                         do_sample=True,
                         temperature=1.0,
                         top_p=1.0).save_pretrained(out_dir)
    _save_tokenizer(tokenizer, out_dir, max_position_embeddings)


def build_tiny_mixtral(out_dir: str,
                       seed: int = 0,
                       hidden_size: int = 128,
                       intermediate_size: int = 128,
                       num_hidden_layers: int = 4,
                       num_local_experts: int = 4,
                       num_experts_per_tok: int = 2,
                       router_std: float = 0.5,
                       max_position_embeddings: int = 2048) -> str:
    """A tiny ``MixtralForCausalLM`` (mixture of experts) with the tiny tokenizer, built into ``out_dir``.

    Weights are drawn with ``initializer_range=0.05``; the routers' with std ``router_std``, larger than the default
    init, so that routing is decisive (no near-ties between two implementations' top-k). About 4.6 MB in float32 at
    the defaults. Returns the absolute path.
    """
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed, model_max_length=max_position_embeddings)
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([PAD_TOKEN, EOS_TOKEN])
    config = MixtralConfig(vocab_size=(len(tokenizer) + 63) // 64 * 64,
                           hidden_size=hidden_size,
                           intermediate_size=intermediate_size,
                           num_hidden_layers=num_hidden_layers,
                           num_attention_heads=4,
                           num_key_value_heads=2,
                           num_local_experts=num_local_experts,
                           num_experts_per_tok=num_experts_per_tok,
                           max_position_embeddings=max_position_embeddings,
                           initializer_range=0.05,
                           bos_token_id=pad_id,
                           eos_token_id=eos_id,
                           pad_token_id=pad_id,
                           architectures=["MixtralForCausalLM"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):  # transformers 5 / 4
                    param.normal_(0.0, router_std)
    model.eval()
    model.should_save_on_this_rank = lambda is_main_process: True  # every rank writes its own copy
    model.save_pretrained(out_dir, safe_serialization=True)
    _save_generation_assets(out_dir, tokenizer, pad_id, eos_id, max_position_embeddings, True)
    return out_dir


def _build_fingerprint(variant: str, seed: int, kwargs: dict[str, Any]) -> str:
    """Hash of everything a build depends on, so a cached model is rebuilt when any of it changes."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    from verl.utils.dataset import tasks

    with open(os.path.abspath(tasks.__file__), "rb") as f:
        h.update(f.read())
    h.update(
        json.dumps(
            [variant, seed, sorted(kwargs.items()), transformers.__version__, tokenizers.__version__],
            default=str).encode())
    return h.hexdigest()[:16]


def get_tiny_model_path(variant: str = "causal_lm", seed: int = 0, cache_dir: str | None = None, **kwargs: Any) -> str:
    """Path of a cached tiny model, building it on first use.

    The cache lives in ``cache_dir``, else ``$VERL_TINY_MODEL_CACHE``, else ``~/.cache/verl/tiny``. Each build goes
    to a private temporary directory that is renamed into place, so concurrent test processes never see a
    half-written model; a process that loses the race uses the winner's copy.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny model variant {variant!r}; choose one of {list(VARIANTS)}")
    root = os.path.abspath(
        os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "verl", "tiny")))
    final = os.path.join(root, f"{variant}-seed{seed}-{_build_fingerprint(variant, seed, kwargs)}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".build-{variant}-")
    try:
        build_tiny_model(tmp, seed=seed, variant=variant, **kwargs)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by other users' processes
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "config.json")):
                # an incomplete entry (left by an older build): move it aside, then publish ours
                stale = tempfile.mkdtemp(dir=root, prefix=f".stale-{variant}-")
                os.rename(final, os.path.join(stale, "old"))
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny Qwen2-architecture test model and tokenizer.")
    parser.add_argument("--out", required=True, help="output directory (a Hugging Face model directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=VARIANTS, default="causal_lm")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=2048, help="tokenizer vocabulary budget")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out,
                            seed=args.seed,
                            variant=args.variant,
                            hidden_size=args.hidden_size,
                            num_hidden_layers=args.num_hidden_layers,
                            vocab_size=args.vocab_size)
    print(path)


if __name__ == "__main__":
    main()
