"""A tiny, randomly initialised LLaMA with a tokenizer trained offline: the LLM used by tests and demos
that must not download anything."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TokenizerStyle = Literal["bytelevel", "sentencepiece"]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

_TEMPLATE_LINES = (
    "#Question: A user has given high ratings to the following {kind}s: {titles}. "
    "Additionally, we have information about the user's preferences encoded in the feature {user_code}. "
    "Using all available information, make a prediction about whether the user would enjoy the {kind} "
    'titled {title} with the feature {item_code}? Answer with "Yes" or "No".\n#Answer: {answer}',
    "#Question: A user has given high ratings to the following {kind}s: {titles}. "
    "Leverage the information to predict whether the user would enjoy the {kind} titled {title}? "
    'Answer with "Yes" or "No".\n#Answer: {answer}',
    "#Question: We have information about the user's preferences encoded in the feature {user_code}. "
    "Using all available information, make a prediction about whether the user would enjoy the {kind} "
    'with the feature {item_code}? Answer with "Yes" or "No".\n#Answer: {answer}',
)

_TITLES = (
    '"Toy Story (1995)"', '"Jumanji (1995)"', '"Heat (1995)"', '"Casino (1995)"', '"Braveheart (1995)"',
    '"Star Wars (1977)"', '"Fargo (1996)"', '"The Godfather (1972)"', '"Titanic (1997)"', '"Alien (1979)"',
    '"Pulp Fiction (1994)"', '"The Matrix (1999)"', '"Forrest Gump (1994)"', '"Men in Black (1997)"',
    '"Back to the Future (1985)"', '"Schindler\'s List (1993)"', '"Jurassic Park (1993)"',
    '"The Silence of the Lambs (1991)"', '"Raiders of the Lost Ark (1981)"', '"American Beauty (1999)"',
)

_ENGLISH = (
    "The movie was a comedy, a drama, an action thriller and a romance. Users watch films and rate them. "
    "This book is a mystery novel about love, war, history, science and adventure. "
    "No history available. The user has not rated any movies yet. yes no Yes No YES NO"
)


def _training_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [_ENGLISH, "0 1 2 3 4 5 6 7 8 9 . 0.1.2.3 255.255.255.255", '"Yes" "No" Yes. No.']

    def binary_code() -> str:
        return "".join(rng.choice("01") for _ in range(32))

    def dotted_code() -> str:
        return ".".join(str(rng.randrange(256)) for _ in range(4))

    for _ in range(400):
        template = rng.choice(_TEMPLATE_LINES)
        code = binary_code if rng.random() < 0.5 else dotted_code
        lines.append(
            template.format(
                kind=rng.choice(("movie", "book")),
                titles=", ".join(rng.sample(_TITLES, rng.randint(1, 5))),
                user_code=code(),
                item_code=code(),
                title=rng.choice(_TITLES),
                answer=rng.choice(("Yes", "No")),
            )
        )
    return lines


def _train_tokenizer(style: TokenizerStyle, vocab_size: int, seed: int) -> Tokenizer:
    specials = [PAD, BOS, EOS, UNK]
    if style == "bytelevel":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "sentencepiece":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(),
                pre_tokenizers.Punctuation(behavior="isolated"),
                pre_tokenizers.Digits(individual_digits=True),
            ]
        )
        tokenizer.decoder = decoders.Metaspace()
        alphabet = [chr(c) for c in range(33, 127)] + ["\u2581", "\n"]
    else:
        raise ValueError(f"style must be 'bytelevel' or 'sentencepiece', got {style!r}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(_training_corpus(seed), trainer=trainer)
    if style == "sentencepiece":
        # LLaMA-style: every encoded text starts with <s>.
        bos_id = tokenizer.token_to_id(BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
    return tokenizer


def build_tiny_llm(
    folder: str | Path,
    *,
    style: TokenizerStyle = "bytelevel",
    seed: int = 0,
    vocab_size: int = 600,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """Write a tiny random LlamaForCausalLM and its tokenizer to `folder` (a Hugging Face model folder).

    "bytelevel" is a GPT-2 style tokenizer (no BOS added, like SmolLM2); "sentencepiece" is a LLaMA style
    one (Metaspace "▁", BOS added). Both split digits one per token. Same seed, same files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(style, vocab_size, seed),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the usual 0.02 so that a wrong mask or position id moves scores far beyond 1e-4.
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
