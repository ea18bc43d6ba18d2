"""A small English grammar for the demo corpus: statements for ASR and question/answer pairs for S2S.

Why a grammar rather than random words: a tiny model trained for a few CPU minutes can only learn
ASR if the text is predictable (about 300 words, 3-10 word sentences that read as language), and a
duplex model can only learn to answer if answers follow from questions. Splits are decided by a hash
of the sentence text, so train/val/test never share a sentence for any seed, yet share one vocabulary.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Percent of the sentence space that belongs to each held-out split (the rest is train).
_HELDOUT_PERCENT = {"val": 5, "test": 5}
MIN_WORDS, MAX_WORDS = 3, 10

# fmt: off
NAMES = ("anna", "ben", "clara", "david", "emma", "lucy", "mark", "nina", "sam", "tom")
DETERMINERS = ("the", "a", "my", "your", "his", "her", "our", "their", "this", "that")
PLURAL_DETERMINERS = ("the", "my", "your", "his", "her", "our", "their", "these", "those", "some")
ADJECTIVES = ("big", "small", "old", "new", "red", "blue", "green", "yellow", "black", "white",
              "brown", "happy", "sad", "quiet", "loud", "warm", "cold", "hot", "soft", "hard",
              "clean", "dirty", "tall", "short", "dark", "light", "fast", "slow", "full", "empty",
              "young", "kind")
# (singular, plural)
NOUNS = (
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"), ("cow", "cows"),
    ("duck", "ducks"), ("rabbit", "rabbits"), ("frog", "frogs"), ("house", "houses"),
    ("car", "cars"), ("boat", "boats"), ("train", "trains"), ("bus", "buses"), ("book", "books"),
    ("table", "tables"), ("chair", "chairs"), ("door", "doors"), ("window", "windows"),
    ("bed", "beds"), ("cup", "cups"), ("ball", "balls"), ("box", "boxes"), ("hat", "hats"),
    ("coat", "coats"), ("key", "keys"), ("tree", "trees"), ("flower", "flowers"),
    ("apple", "apples"), ("cake", "cakes"), ("letter", "letters"), ("teacher", "teachers"),
    ("baby", "babies"), ("child", "children"), ("man", "men"), ("woman", "women"),
    ("friend", "friends"),
)
MASS_NOUNS = ("bread", "milk", "water", "tea", "soup", "rice", "cheese", "coffee")
PLACES = ("garden", "park", "river", "lake", "school", "shop", "market", "kitchen", "city",
          "forest", "field", "station")
# (base, third person singular, past)
TRANSITIVE_VERBS = (
    ("see", "sees", "saw"), ("like", "likes", "liked"), ("want", "wants", "wanted"),
    ("find", "finds", "found"), ("carry", "carries", "carried"), ("open", "opens", "opened"),
    ("paint", "paints", "painted"), ("clean", "cleans", "cleaned"), ("buy", "buys", "bought"),
    ("bring", "brings", "brought"), ("hold", "holds", "held"), ("wash", "washes", "washed"),
    ("watch", "watches", "watched"), ("need", "needs", "needed"), ("fix", "fixes", "fixed"),
    ("take", "takes", "took"), ("help", "helps", "helped"), ("love", "loves", "loved"),
)
INTRANSITIVE_VERBS = (
    ("sleep", "sleeps", "slept"), ("run", "runs", "ran"), ("walk", "walks", "walked"),
    ("sing", "sings", "sang"), ("smile", "smiles", "smiled"), ("wait", "waits", "waited"),
    ("laugh", "laughs", "laughed"), ("jump", "jumps", "jumped"), ("swim", "swims", "swam"),
    ("dance", "dances", "danced"), ("work", "works", "worked"), ("play", "plays", "played"),
)
ADVERBS = ("quickly", "slowly", "quietly", "happily", "often", "always", "sometimes", "again")
TIMES = ("today", "tonight", "yesterday", "tomorrow", "every day", "in the morning",
         "in the evening", "at night", "after lunch", "before dinner")
PREPOSITIONS = ("in", "on", "under", "near", "behind", "next to", "inside")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
           "eighteen", "nineteen", "twenty")
# Facts for the question/answer grammar: answers follow from the question, so they can be learned.
OPPOSITES = (("big", "small"), ("old", "new"), ("hot", "cold"), ("fast", "slow"),
             ("happy", "sad"), ("light", "dark"), ("full", "empty"), ("loud", "quiet"),
             ("clean", "dirty"), ("tall", "short"), ("hard", "soft"), ("young", "old"),
             ("up", "down"), ("day", "night"), ("yes", "no"), ("open", "closed"))
COLOURS = (("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("snow", "white"),
           ("night", "dark"), ("milk", "white"), ("apple", "red"), ("coffee", "brown"),
           ("banana", "yellow"), ("tomato", "red"), ("leaf", "green"), ("cloud", "grey"))
ANIMAL_HOMES = (("dog", "house"), ("cow", "field"), ("duck", "lake"), ("frog", "river"),
                ("bird", "tree"), ("horse", "field"), ("rabbit", "forest"), ("cat", "house"),
                ("fish", "river"), ("bee", "garden"))
ANIMAL_LEGS = (("dog", 4), ("cat", 4), ("bird", 2), ("horse", 4), ("cow", 4), ("duck", 2),
               ("rabbit", 4), ("frog", 4), ("fish", 0), ("bee", 6), ("spider", 8))
# fmt: on


_PLURALS = frozenset(plural for _, plural in NOUNS)


@dataclass(frozen=True)
class QAPair:
    """One S2S exchange: what the user asks and what the agent answers."""

    question: str
    answer: str


def split_of(text: str) -> str:
    """The split a sentence belongs to, from a stable hash of its text (independent of seed)."""
    bucket = int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "big") % 100
    if bucket < _HELDOUT_PERCENT["val"]:
        return "val"
    if bucket < _HELDOUT_PERCENT["val"] + _HELDOUT_PERCENT["test"]:
        return "test"
    return "train"


def _noun_phrase(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(NAMES)
    if rng.random() < 0.2:
        words = [rng.choice(PLURAL_DETERMINERS)]
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        words.append(rng.choice(NOUNS)[1])
        return " ".join(words)
    det = rng.choice(DETERMINERS)
    adj = rng.choice(ADJECTIVES) if rng.random() < 0.5 else None
    noun = rng.choice(NOUNS)[0]
    if det == "a" and (adj or noun)[0] in "aeiou":
        det = "an"
    return " ".join(w for w in (det, adj, noun) if w)


def _subject_verb(rng: random.Random, verb: tuple[str, str, str]) -> tuple[str, str]:
    """A subject and the verb form agreeing with it (present or past)."""
    subject = _noun_phrase(rng)
    plural = subject.split()[-1] in _PLURALS
    if rng.random() < 0.4:
        return subject, verb[2]
    return subject, verb[0] if plural else verb[1]


def _statement(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:  # the old dog sees a red ball near the river
        subj, verb = _subject_verb(rng, rng.choice(TRANSITIVE_VERBS))
        words = [subj, verb, _noun_phrase(rng)]
        if rng.random() < 0.5:
            words += [rng.choice(PREPOSITIONS), "the", rng.choice(PLACES)]
        return " ".join(words)
    if kind == 1:  # anna sings quietly in the evening
        subj, verb = _subject_verb(rng, rng.choice(INTRANSITIVE_VERBS))
        words = [subj, verb]
        if rng.random() < 0.6:
            words.append(rng.choice(ADVERBS))
        if rng.random() < 0.6:
            words.append(rng.choice(TIMES))
        return " ".join(words)
    if kind == 2:  # the kitchen is warm today
        place = rng.choice(PLACES + tuple(n for n, _ in NOUNS))
        words = ["the", place, "is", rng.choice(ADJECTIVES)]
        if rng.random() < 0.5:
            words.append(rng.choice(TIMES))
        return " ".join(words)
    if kind == 3:  # there are seven small cups on the table
        n = rng.randrange(2, len(NUMBERS))
        words = ["there are", NUMBERS[n]]
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        words += [rng.choice(NOUNS)[1], rng.choice(PREPOSITIONS), "the", rng.choice(PLACES)]
        return " ".join(words)
    if kind == 4:  # please bring me some milk
        verb = rng.choice(TRANSITIVE_VERBS)[0]
        obj = rng.choice(("some " + rng.choice(MASS_NOUNS), _noun_phrase(rng)))
        words = ["please", verb, obj]
        if rng.random() < 0.4:
            words.append(rng.choice(TIMES))
        return " ".join(words)
    if kind == 5:  # emma wants to paint the small house
        name = rng.choice(NAMES)
        verb = rng.choice(TRANSITIVE_VERBS)[0]
        return " ".join([name, rng.choice(("wants", "likes", "needs")), "to", verb, _noun_phrase(rng)])
    # we drink warm tea after lunch
    pronoun = rng.choice(("i", "we", "you", "they"))
    verb = rng.choice(("drink", "make", "like", "want", "need", "buy"))
    words = [pronoun, verb]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(MASS_NOUNS))
    if rng.random() < 0.5:
        words.append(rng.choice(TIMES))
    return " ".join(words)


def _qa(rng: random.Random) -> QAPair:
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randrange(0, 11), rng.randrange(0, 11)
        q = f"what is {NUMBERS[a]} plus {NUMBERS[b]}"
        return QAPair(q, f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}")
    if kind == 1:
        a, b = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        return QAPair(f"what is the opposite of {a}", f"the opposite of {a} is {b}")
    if kind == 2:
        thing, colour = rng.choice(COLOURS)
        return QAPair(f"what colour is the {thing}", f"the {thing} is {colour}")
    if kind == 3:
        animal, home = rng.choice(ANIMAL_HOMES)
        return QAPair(f"where does the {animal} live", f"the {animal} lives in the {home}")
    if kind == 4:
        animal, legs = rng.choice(ANIMAL_LEGS)
        return QAPair(f"how many legs does a {animal} have", f"a {animal} has {NUMBERS[legs]} legs")
    if kind == 5:
        n = rng.randrange(0, len(NUMBERS) - 1)
        return QAPair(f"what comes after {NUMBERS[n]}", f"{NUMBERS[n + 1]} comes after {NUMBERS[n]}")
    sentence = _statement(rng)
    while len(sentence.split()) > 7:
        sentence = _statement(rng)
    return QAPair(f"please repeat {sentence}", sentence)


def generate_sentences(split: str, seed: int) -> Iterator[str]:
    """Endless deterministic stream of unique statements in ``split``, 3-10 words, uniform in length.

    A uniform length spreads utterance durations (1-6 s), so duration bucketing matters. Drafts of
    the wrong length are kept for later, which makes long (rare) sentences affordable.
    """
    _check_split(split)
    rng = random.Random(f"sentences-{split}-{seed}")
    seen: set[str] = set()
    spare: dict[int, deque[str]] = {n: deque() for n in range(MIN_WORDS, MAX_WORDS + 1)}
    while True:
        num_words = rng.randint(MIN_WORDS, MAX_WORDS)
        while not spare[num_words]:
            text = _statement(rng)
            n = len(text.split())
            if n in spare and text not in seen and split_of(text) == split:
                seen.add(text)
                spare[n].append(text)
        yield spare[num_words].popleft()


def generate_qa_pairs(split: str, seed: int) -> Iterator[QAPair]:
    """Endless deterministic stream of Q/A pairs whose question belongs to ``split``.

    The arithmetic/fact questions form a small closed set, so questions repeat within a split;
    the split is decided by the question, so no question appears in two splits.
    """
    _check_split(split)
    rng = random.Random(f"qa-{split}-{seed}")
    while True:
        pair = _qa(rng)
        if split_of(pair.question) == split:
            yield pair


def vocabulary() -> set[str]:
    """Every word the grammars can produce (for tests and for sizing the tokenizer)."""
    groups = [NAMES, DETERMINERS, PLURAL_DETERMINERS, ADJECTIVES, MASS_NOUNS, PLACES, ADVERBS]
    groups += [TIMES, PREPOSITIONS, NUMBERS, [w for pair in NOUNS for w in pair]]
    groups += [[w for v in TRANSITIVE_VERBS + INTRANSITIVE_VERBS for w in v]]
    groups += [[w for pair in OPPOSITES + COLOURS + ANIMAL_HOMES for w in pair]]
    groups += [[a for a, _ in ANIMAL_LEGS]]
    extra = "an is are there please me some to wants likes needs i we you they drink make like want"
    extra += " need buy what plus opposite of colour where does live lives how many legs have has"
    extra += " comes after repeat legs"
    words = {w for group in groups for phrase in group for w in phrase.split()}
    return words | set(extra.split())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; use one of {SPLITS}")
