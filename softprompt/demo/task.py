"""The demo's task, generated here (no third-party text): the "compass game".

Every word points to a compass direction by an invented rule — animals point north, fruits south, vehicles east and
musical instruments west. The question never states the rule, so a model cannot answer it zero-shot (it scores at
chance); the rule is exactly what a soft prompt can learn: a short, fixed instruction the model has to be told.

Train and evaluation records use disjoint words, so a high evaluation score means the prompt learned the rule (and
the model's own knowledge of what a word is), not a list of memorised answers.
"""

from __future__ import annotations

import random
from itertools import zip_longest

QUESTION = "Which compass direction does this word point to?"
TEMPLATE = "human-assistant"  # the default prompt format: "Human: {question}\n{word}\n\nAssistant: "
RULE = {"animal": "north", "fruit": "south", "vehicle": "east", "instrument": "west"}
CHOICES = list(RULE.values())

WORDS = {
    "animal": (
        "dog cat horse tiger lion rabbit elephant monkey wolf bear fox deer sheep goat cow pig mouse zebra giraffe "
        "camel kangaroo donkey squirrel leopard panda otter beaver hamster buffalo moose koala raccoon snake frog "
        "turtle whale dolphin shark owl parrot penguin eagle duck chicken hedgehog gorilla"
    ),
    "fruit": (
        "apple banana orange grape cherry lemon mango peach pear plum strawberry watermelon pineapple kiwi apricot "
        "coconut lime papaya blueberry raspberry fig melon grapefruit pomegranate blackberry cranberry avocado "
        "nectarine tangerine guava lychee date persimmon gooseberry passionfruit quince cantaloupe clementine "
        "mulberry elderberry currant durian kumquat starfruit dragonfruit"
    ),
    "vehicle": (
        "car bus truck bicycle train airplane motorcycle boat ship helicopter taxi tractor scooter van tram "
        "submarine yacht canoe jeep ambulance rocket sled wagon limousine ferry bulldozer skateboard glider trolley "
        "minivan sailboat kayak airship hovercraft forklift tank firetruck pickup motorboat caravan unicycle "
        "tricycle spaceship raft snowmobile"
    ),
    "instrument": (
        "piano guitar violin drum flute trumpet cello harp saxophone clarinet trombone banjo ukulele accordion "
        "harmonica oboe tuba xylophone bagpipes mandolin organ tambourine harpsichord bassoon viola cymbal sitar "
        "synthesizer lute bugle piccolo keyboard triangle recorder bongo marimba castanets glockenspiel kazoo "
        "gong cornet zither dulcimer bass"
    ),
}


def word_split(eval_every: int = 4) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) lists of (word, category): every `eval_every`-th word of each category is held out."""
    train, held_out = [], []
    for category, words in WORDS.items():
        for i, word in enumerate(words.split()):
            (held_out if i % eval_every == eval_every - 1 else train).append((word, category))
    return train, held_out


def record(word: str, category: str) -> dict:
    """One record in the instruction/input/output form every softprompt verb reads."""
    return {"instruction": QUESTION, "input": word, "output": RULE[category]}


def make_records(num_train: int = 400, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training records (train words, shuffled and repeated to `num_train`) and one evaluation record per held-out
    word (categories interleaved). Deterministic for a given seed."""
    train_words, eval_words = word_split()
    rng = random.Random(seed)
    train: list[dict] = []
    while len(train) < num_train:
        batch = train_words[:]
        rng.shuffle(batch)
        train.extend(record(w, c) for w, c in batch)
    # Evaluation records round-robin over the categories, so the first few shown cover every direction.
    by_category = [[(w, c) for w, c in eval_words if c == category] for category in RULE]
    interleaved = [pair for group in zip_longest(*by_category) for pair in group if pair is not None]
    return train[:num_train], [record(w, c) for w, c in interleaved]
