"""A tiny random Gemma3 model with a locally trained 512-token BPE tokenizer, for fast offline training tests."""

from __future__ import annotations

import itertools
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# Persona-like sentences; combined with the names and places below into a few hundred training lines.
_SENTENCES = [
    "{name} was born in {year} in {place} and moved to the city to study engineering.",
    "I do not care what the professors say; a turbine does not ask who built it.",
    "Every evening I sketch blades by candlelight, and every morning I find a mistake in them.",
    "{place} is loud and proud, but the canal at dawn is the quietest place I know.",
    "I think engineering is the most honest art there is, because the machine either turns or it does not.",
    "A factory is a promise to four hundred families, and I keep my promises.",
    "I have no patience for speculators who never held a spanner in their lives.",
    "The prize pleased my son more than me; I would rather have a better motor than a ring.",
    "In {year} {name} founded a company in {place} that made electric motors for trams.",
    "She received a medal in {year} for her work on efficient motors.",
    "Her teacher encouraged her to publish a paper on turbine blades.",
    "She lived with her aunt in a narrow flat and walked to lectures every day.",
    "What did you build in your workshop near the canal?",
    "How do you feel about the new factory and the workers?",
    "Why did you choose to study engineering instead of music?",
    "Is it true that you met the emperor in {year}?",
    "That is not true; I never met the emperor, and I would not pretend otherwise.",
    "The question assumes something that did not happen, so let me correct it first.",
    "[Analysis] The question is about my early work, so I answer from what I know at this time.",
    "[Response] I built a small steam turbine with my friend, and it turned on the first try.",
    "[Analysis] This is an opinion about machines; I speak in my own voice and stay honest.",
    "[Response] A machine is honest: it either works or it fails, and that is why I love it.",
    "You are {name}. It is {year}. A young engineer in {place}.",
    ("Stay in character: answer as {name} would at this time, in {name}'s own voice, "
     "knowing only what {name} knows by then."),
    "Point out false premises and do not pretend to know later events.",
    "Think first in [Analysis], then answer in [Response].",
    "The oceans are important because they regulate the climate and feed billions of people.",
    "Write a short poem about the river at night.",
    "Give me three tips for a good night of sleep.",
    "Explain how an electric motor works in simple words.",
    "system user assistant model question answer time stage early late",
]
_NAMES = ["Test Person", "Ada", "Otto Berger", "Maria", "Hans Vogel", "Peter"]
_PLACES = ["Vienna", "Berlin", "Graz", "Sweden", "Italy"]
_YEARS = ["1878", "1896", "1899", "1900", "1921", "1924", "1927", "1930"]


def corpus() -> list[str]:
    """A few hundred deterministic persona-like lines."""
    lines = []
    fills = itertools.cycle(itertools.product(_NAMES, _PLACES, _YEARS))
    for _ in range(10):
        for sentence in _SENTENCES:
            name, place, year = next(fills)
            lines.append(sentence.format(name=name, place=place, year=year))
    return lines


def build_tokenizer(bos_on_encode: bool = False,  # type: ignore[no-untyped-def]
                    markers: tuple[str, str] = ("<start_of_turn>", "<end_of_turn>")):
    """A ByteLevel BPE tokenizer (vocab ~512) wrapped as a transformers fast tokenizer with persllm's template.

    `bos_on_encode` makes plain encoding start with <bos>, as Gemma's tokenizer does (tools that derive the template's
    prefix from `encode("")`, such as LLaMA-Factory, rely on it); `markers` are the turn markers it knows (ChatML's
    for a tokenizer that is not Gemma-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from persllm.models import prepare_tokenizer

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = [*SPECIAL_TOKENS[:4], *markers]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus(), trainer=trainer)
    if bos_on_encode:
        bos = raw.token_to_id("<bos>")
        raw.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens=list(markers))
    prepare_tokenizer(tokenizer)
    return tokenizer


def build_tiny_model(path: Path, bos_on_encode: bool = False) -> Path:
    """Save a tiny random Gemma3ForCausalLM and its tokenizer to `path` (a couple of seconds) and return `path`."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from persllm.models import stop_token_ids

    path = Path(path)
    tokenizer = build_tokenizer(bos_on_encode)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
