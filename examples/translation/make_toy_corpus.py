"""Writes a small synthetic parallel corpus for the translation demo and tests (deterministic for a given seed).

The source side is English-like: ``det adj* noun verb det adj* noun [prep det adj* noun]`` with plural ``-s``,
past ``-ed`` and future ``will``. The target side is an invented language that makes the model learn what real
translation needs, on a scale a CPU trains in minutes:
  - a word mapping: every source lemma has its own invented target lemma;
  - morphology: nouns have a gender; articles and adjectives agree with their noun in gender and number;
    the verb takes a tense suffix and agrees with the subject's number;
  - reordering: adjectives follow their noun (in reverse order, as in French) and the verb moves to the end
    of the clause, after the object and the prepositional phrase (as in a German subordinate clause).

Output: ``{out_dir}/{train,valid,test}.{src,tgt}``, one whitespace-tokenized sentence per line.
"""
import argparse
import os
import random

NOUNS = ("dog cat bird horse king queen pilot farmer teacher doctor river mountain city garden house "
         "window table book letter song ship train road forest flower apple stone bridge tower lamp").split()
ADJECTIVES = "big small old young red green happy sad quiet loud fast slow bright dark warm cold".split()
VERBS = "like help want call follow watch visit paint kick open push pull greet join".split()
PREPOSITIONS = "near behind under beside".split()

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
TARGET_ARTICLES = {("m", "sg"): "lo", ("f", "sg"): "la", ("m", "pl"): "los", ("f", "pl"): "las"}
ADJECTIVE_SUFFIX = {("m", "sg"): "o", ("f", "sg"): "a", ("m", "pl"): "os", ("f", "pl"): "as"}
TENSE_SUFFIX = {"present": "", "past": "ti", "future": "ra"}
NUMBER_SUFFIX = {"sg": "n", "pl": "nt"}


def invented_lexicon(rng: random.Random, words) -> dict:
    """Maps each word to a distinct invented stem of two or three syllables."""
    lexicon, used = {}, set()
    for word in words:
        stem = ""
        while not stem or stem in used:
            stem = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))
        used.add(stem)
        lexicon[word] = stem
    return lexicon


class ToyGrammar:
    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.rng = rng
        self.noun = invented_lexicon(rng, NOUNS)
        self.gender = {noun: rng.choice("mf") for noun in NOUNS}
        self.adjective = invented_lexicon(rng, ADJECTIVES)
        self.verb = invented_lexicon(rng, VERBS)
        self.preposition = invented_lexicon(rng, PREPOSITIONS)

    def noun_phrase(self):
        """Returns (source words, target words, grammatical number) of a random noun phrase."""
        rng = self.rng
        noun, number = rng.choice(NOUNS), rng.choice(("sg", "pl"))
        adjectives = rng.sample(ADJECTIVES, rng.choice((0, 0, 1, 1, 2)))
        determiner = "the" if number == "pl" else rng.choice(("the", "a"))
        source = [determiner, *adjectives, noun + ("s" if number == "pl" else "")]
        if determiner == "a" and source[1][0] in "aeiou":
            source[0] = "an"
        agreement = (self.gender[noun], number)
        article = TARGET_ARTICLES[agreement] if determiner == "the" else "un"
        target_noun = self.noun[noun] + ("i" if number == "pl" else "")
        target_adjectives = [self.adjective[a] + ADJECTIVE_SUFFIX[agreement] for a in reversed(adjectives)]
        return source, [article, target_noun, *target_adjectives], number

    def sentence_pair(self):
        rng = self.rng
        subject, subject_target, subject_number = self.noun_phrase()
        obj, obj_target, _ = self.noun_phrase()
        verb, tense = rng.choice(VERBS), rng.choice(("present", "past", "future"))
        if tense == "past":
            source_verb = [verb + ("d" if verb.endswith("e") else "ed")]
        elif tense == "future":
            source_verb = ["will", verb]
        elif subject_number == "sg":
            source_verb = [verb + ("es" if verb.endswith(("sh", "ch")) else "s")]
        else:
            source_verb = [verb]
        source, target = subject + source_verb + obj, subject_target + obj_target
        if rng.random() < 0.5:
            preposition = rng.choice(PREPOSITIONS)
            place, place_target, _ = self.noun_phrase()
            source += [preposition, *place]
            target += [self.preposition[preposition], *place_target]
        target.append(self.verb[verb] + TENSE_SUFFIX[tense] + NUMBER_SUFFIX[subject_number])
        return " ".join(source), " ".join(target)


def write_corpus(out_dir: str, train_size: int = 6000, valid_size: int = 300, test_size: int = 300,
                 seed: int = 1) -> None:
    """Writes the splits; test and valid sentences never occur in train (nor in each other)."""
    grammar = ToyGrammar(seed)
    seen = set()
    os.makedirs(out_dir, exist_ok=True)
    for split, size in (("test", test_size), ("valid", valid_size), ("train", train_size)):
        pairs = []
        while len(pairs) < size:
            pair = grammar.sentence_pair()
            if pair[0] not in seen:
                seen.add(pair[0])
                pairs.append(pair)
        for side, lang in enumerate(("src", "tgt")):
            path = os.path.join(out_dir, f"{split}.{lang}")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(pair[side] + "\n" for pair in pairs)
            os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--valid-size", type=int, default=300)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    write_corpus(args.out_dir, args.train_size, args.valid_size, args.test_size, args.seed)
    print(f"wrote {args.train_size}/{args.valid_size}/{args.test_size} sentence pairs to {args.out_dir}")


if __name__ == "__main__":
    main()
