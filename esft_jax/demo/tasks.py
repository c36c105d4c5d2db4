"""Six generated downstream tasks that mirror the paper's (math, code, intent, summary, law, translation).

The paper's task data cannot be downloaded where the demo runs, and a tiny model could not learn it anyway, so
each task is a small template grammar with the same shape as the original: a question, a short answer, and
the paper's metric (see `esft_jax.evaluate.metrics.METRICS`). Every item is drawn from a `random.Random`
seeded by a string, so a task is the same on every machine for a given seed.

Train records are ESFT's training format ({"messages": [user, assistant]}); test records are its eval format
({"prompt": "User: Q\\n\\nAssistant:", "answers": [A], "raw_answers": [A]}, plus "tests" for code). The test
split is drawn first, so it does not depend on n_train, and no prompt appears twice in a task.
"""

from __future__ import annotations

import dataclasses
import json
import random
import zlib
from typing import Callable, NamedTuple

from esft_jax.data.formatting import user_piece


class Sample(NamedTuple):
  """One generated item, before it is written as a train or a test record."""
  question: str
  answer: str
  extra: dict  # eval-item fields the metric needs besides the answer


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  metric: str  # a key of esft_jax.evaluate.metrics.METRICS
  train: list[dict]
  test: list[dict]
  seed: int


# --- math: multi-step word problems, worked step by step -----------------------------------------------------

# Answers end in GSM8K's "#### N": the math metric reads that from references as well as from predictions,
# whereas a reference ending "The answer is N" would be compared as a whole string.
_PEOPLE = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kai", "Lea")
_THINGS = ("apples", "pens", "stamps", "marbles", "books", "coins", "shells", "cards", "eggs", "cups")


def _math_sample(rng: random.Random) -> Sample:
  """One or two additions and subtractions on a count below 30: small enough that the pretrained base's
  examples give it partial skill and fine-tuning more (the paper's enhancement tasks)."""
  person, friend = rng.sample(_PEOPLE, 2)
  things = rng.choice(_THINGS)
  total = rng.randint(2, 12)
  sentences, steps = [f"{person} has {total} {things}."], []
  for _ in range(rng.randint(1, 2)):
    if total > 1 and rng.random() < 0.5:
      k = rng.randint(1, min(9, total - 1))
      sentences.append(f"{person} gives {k} to {friend}.")
      steps.append(f"{total} - {k} = {total - k}")
      total -= k
    else:
      k = rng.randint(1, 9)
      sentences.append(f"{person} buys {k} more.")
      steps.append(f"{total} + {k} = {total + k}")
      total += k
  question = " ".join(sentences) + f" How many {things} does {person} have now?"
  return Sample(question, ". ".join(steps) + f". #### {total}", {})


# --- code: write a small function, checked by running asserts -----------------------------------------------

# (first step, later step, operator, precedence, value); {a} is the argument, {k} the constant.
_CODE_OPS = (
    ("adds {k} to {a}", "adds {k}", "+", 1, lambda v, k: v + k),
    ("subtracts {k} from {a}", "subtracts {k}", "-", 1, lambda v, k: v - k),
    ("multiplies {a} by {k}", "multiplies by {k}", "*", 2, lambda v, k: v * k),
    ("divides {a} by {k} rounding down", "divides by {k} rounding down", "//", 2, lambda v, k: v // k),
    ("takes {a} modulo {k}", "takes the result modulo {k}", "%", 2, lambda v, k: v % k),
    ("squares {a}", "squares the result", "**", 3, lambda v, k: v**2),
)
_FUNCTION_NAMES = ("f", "g", "calc", "scale", "shift", "step", "mix", "tweak")
_ARGUMENTS = ("x", "n", "a", "v")


def _code_sample(rng: random.Random) -> Sample:
  name, arg = rng.choice(_FUNCTION_NAMES), rng.choice(_ARGUMENTS)
  ops = [(rng.choice(_CODE_OPS), rng.randint(2, 9)) for _ in range(1 if rng.random() < 0.7 else 2)]
  phrases, expr, expr_precedence = [], arg, 4
  for i, ((first, later, symbol, precedence, _), k) in enumerate(ops):
    phrases.append((later if i else first).format(a=arg, k=k))
    # The running expression is the left operand: it needs brackets if it binds more loosely than the new
    # operator or, for the right-associative **, as loosely.
    if expr_precedence < precedence or (symbol == "**" and expr_precedence <= precedence):
      expr = f"({expr})"
    expr, expr_precedence = f"{expr} {symbol} {2 if symbol == '**' else k}", precedence
  inputs = rng.sample(range(0, 21), 3)
  asserts = []
  for x in inputs:
    value = x
    for (*_, apply), k in ops:
      value = apply(value, k)
    asserts.append(f"assert {name}({x}) == {value}")
  question = f"Write a Python function {name}({arg}) that {', then '.join(phrases)}."
  return Sample(question, f"def {name}({arg}):\n    return {expr}", {"tests": "\n".join(asserts)})


# --- intent: utterance -> {"intent": ..., "slots": {...}} ---------------------------------------------------

# Slot values have no spaces: the intent metric strips spaces from predicted values but not from references.
_SLOT_VALUES = {
    "time": ("6am", "7am", "8am", "9am", "noon", "1pm", "3pm", "5pm", "7pm", "9pm", "10pm", "midnight"),
    "date": ("today", "tomorrow", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"),
    "city": ("paris", "tokyo", "lima", "oslo", "cairo", "delhi", "rome", "boston", "sydney", "berlin"),
    "genre": ("jazz", "rock", "blues", "techno", "reggae", "classical", "folk", "metal"),
    "artist": ("adele", "queen", "abba", "coldplay", "eminem", "shakira", "beyonce", "drake"),
    "number": ("2", "5", "10", "15", "20", "30", "45"),
    "unit": ("seconds", "minutes", "hours"),
    "action": ("on", "off"),
    "room": ("kitchen", "bedroom", "bathroom", "garage", "office", "hallway"),
    "contact": ("mom", "dad", "maria", "omar", "lucas", "nina", "sam", "grandma"),
    "task": ("shopping", "laundry", "homework", "gym", "dentist", "meeting", "rent"),
    "destination": ("airport", "station", "museum", "library", "hospital", "beach", "stadium"),
    "mode": ("bus", "car", "bike", "train"),
    "dish": ("pasta", "curry", "soup", "pancakes", "risotto", "tacos", "lasagna"),
}
# intent -> utterance templates; a {slot} in a template is filled and reported; {date?}/{mode?} are optional.
_INTENTS = {
    "Alarm-Set": ("wake me up at {time}{date?}", "set an alarm for {time}{date?}", "alarm at {time}{date?}"),
    "Weather-Query": ("what is the weather in {city}{date?}", "will it rain in {city}{date?}",
                      "is it cold in {city}{date?}"),
    "Music-Play": ("play some {genre} music", "put on {artist}", "i want to hear {artist}", "play {genre}"),
    "Timer-Set": ("start a timer for {number} {unit}", "set a timer of {number} {unit}",
                  "count down {number} {unit}"),
    "Light-Control": ("turn {action} the {room} lights", "switch the lights {action} in the {room}",
                      "{room} lights {action}"),
    "Call-Contact": ("call {contact}", "phone {contact} now", "ring {contact} for me"),
    "Reminder-Add": ("remind me about the {task}{date?}", "add a reminder for the {task}{date?}",
                     "dont let me forget the {task}{date?}"),
    "Navigation": ("take me to the {destination}{mode?}", "how do i get to the {destination}{mode?}",
                   "directions to the {destination}{mode?}"),
    "Recipe-Search": ("how do i cook {dish}", "find a recipe for {dish}", "show me how to make {dish}"),
}
_POLITE = ("", "please ", "hey, ", "can you ")


def _intent_sample(rng: random.Random) -> Sample:
  intent = rng.choice(sorted(_INTENTS))
  template = rng.choice(_INTENTS[intent])
  slots = {}
  for slot, values in _SLOT_VALUES.items():
    if "{" + slot + "}" in template or ("{" + slot + "?}" in template and rng.random() < 0.5):
      slots[slot] = rng.choice(values)
  phrases = {
      "date?": "" if "date" not in slots else f" {slots['date']}" if slots["date"] in ("today", "tomorrow")
      else f" on {slots['date']}",
      "mode?": f" by {slots['mode']}" if "mode" in slots else "",
  }
  utterance = rng.choice(_POLITE) + template.format(**slots, **phrases)
  answer = json.dumps({"intent": intent, "slots": slots})
  return Sample(f"Find the intent and slots of: {utterance}", answer, {})


# --- summary: a support call -> a one-line structured summary ------------------------------------------------

_CUSTOMERS = ("Ana", "Raj", "Mei", "Tom", "Sara", "Leo", "Yuki", "Omar", "Lina", "Paul")
_PRODUCTS = ("internet", "phone", "tv", "router", "laptop", "printer", "fridge", "heater")
# (how the customer says it, the summary's word)
_PROBLEMS = (("keeps dropping out", "drops"), ("does not turn on", "dead"), ("is very slow", "slow"),
             ("makes a loud noise", "noisy"), ("shows an error", "error"), ("keeps restarting", "restarts"))
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# (what the agent says, the summary's words); {day} is the agent's day, {n} a sum of money.
_RESOLUTIONS = (("I will send a technician on {day}", "technician on {day}"),
                ("I will refund you {n} dollars", "refund of {n} dollars"),
                ("I will ship you a new one", "replacement shipped"),
                ("Please reset it to factory settings", "factory reset advised"))


def _summary_sample(rng: random.Random) -> Sample:
  name, product = rng.choice(_CUSTOMERS), rng.choice(_PRODUCTS)
  problem, label = rng.choice(_PROBLEMS)
  since, visit = rng.sample(_DAYS, 2)
  said, done = rng.choice(_RESOLUTIONS)
  n = rng.choice(range(10, 101, 5))
  said, done = said.format(day=visit, n=n), done.format(day=visit, n=n)
  opening = rng.choice(("Hi, this is {name}.", "Hello, my name is {name}.", "{name} here.")).format(name=name)
  if rng.random() < 0.5:
    lines = [f"C: {opening} My {product} {problem} since {since}.", "A: Did you restart it?",
             "C: Yes, it did not help.", f"A: Sorry. {said}."]
  else:
    lines = [f"C: {opening} My {product} {problem}.", "A: Since when?", f"C: Since {since}.",
             f"A: Sorry. {said}."]
  summary = f"Customer {name}: {product} {label} since {since}. Action: {done}."
  return Sample("Summarize the call.\n" + "\n".join(lines), summary, {})


# --- law: case facts -> verdict by fixed rules ----------------------------------------------------------------

_DEFENDANTS = ("Adams", "Baker", "Clark", "Diaz", "Evans", "Foster", "Garcia", "Hill", "Ito", "Jones")
_ITEMS = ("bicycle", "phone", "watch", "laptop", "painting", "camera", "guitar", "scooter")
_PLACES = ("shop", "school", "park", "hotel", "office", "market")
_VICTIMS = ("neighbor", "tourist", "student", "driver", "waiter")
_PENALTIES = ("a fine of 200 dollars", "a fine of 1000 dollars", "prison for 1 year", "prison for 3 years")


def _law_sample(rng: random.Random) -> Sample:
  """Guilt follows the intent sentence; the sentence tier follows the value (under 500, under 2000, more) or
  the injury (minor, serious), one tier up with a prior conviction."""
  who, item, place, victim = (rng.choice(x) for x in (_DEFENDANTS, _ITEMS, _PLACES, _VICTIMS))
  value = rng.choice(range(50, 4001, 50))
  crime = rng.choice(("theft", "vandalism", "fraud", "assault"))
  guilty = rng.random() < 0.75
  tier = 0 if value < 500 else 1 if value < 2000 else 2
  if crime == "theft":
    act = f"took a {item} worth {value} dollars from a {place}"
    intent = f"{who} meant to keep it." if guilty else f"{who} thought the {item} was their own."
    remedy = f"Must return the {item}."
  elif crime == "vandalism":
    act = f"broke a {item} worth {value} dollars at a {place}"
    intent = "It was done on purpose." if guilty else "It was an accident."
    remedy = f"Must pay {value} dollars in damages."
  elif crime == "fraud":
    act = f"sold a fake {item} for {value} dollars to a {victim}"
    intent = f"{who} knew it was fake." if guilty else f"{who} did not know it was fake."
    remedy = f"Must refund {value} dollars."
  else:
    injury = rng.choice(("minor", "serious"))
    act = f"hit a {victim} at a {place}, causing a {injury} injury"
    intent = f"{who} started the fight." if guilty else f"{who} acted in self-defense."
    remedy = "Must pay the medical costs." if guilty else "No penalty."
    tier = 1 if injury == "minor" else 2
  prior = rng.random() < 0.3
  record = f"{who} has a prior conviction." if prior else f"{who} has no prior record."
  question = f"Give the verdict. Facts: {who} {act} on {rng.choice(_DAYS)}. {intent} {record}"
  if not guilty:
    return Sample(question, f"{who} is not guilty of {crime}. {remedy}", {})
  return Sample(question, f"{who} is guilty of {crime}. Sentence: {_PENALTIES[tier + int(prior)]}. {remedy}", {})


# --- translation: English -> Veltan, a made-up SOV language with case and tense suffixes -------------------

# (singular, plural, Veltan stem). Veltan marks plural "-ti", subject "-ka", object "-mo"; adjectives follow
# the noun; a place comes first with "-ri" (in) or "-pa" (near); the verb comes last with "-su" (present)
# or "-ta" (past).
_ANIMATES = (("dog", "dogs", "vaku"), ("cat", "cats", "mirel"), ("bird", "birds", "tosi"),
             ("child", "children", "neka"), ("farmer", "farmers", "dolam"), ("king", "kings", "ruvo"),
             ("horse", "horses", "helin"), ("woman", "women", "sama"), ("man", "men", "toru"),
             ("teacher", "teachers", "ivan"))
_OBJECTS = _ANIMATES + (("apple", "apples", "pomi"), ("book", "books", "lirat"), ("stone", "stones", "gul"),
                        ("house", "houses", "domu"), ("boat", "boats", "navi"))
_ADJECTIVES = (("big", "tarn"), ("small", "pim"), ("red", "oska"), ("old", "ulve"), ("young", "sen"),
               ("happy", "halo"), ("black", "dusk"), ("white", "lume"))
# (base, third person singular, past, Veltan stem)
_VERBS = (("see", "sees", "saw", "velt"), ("find", "finds", "found", "rasi"), ("carry", "carries", "carried", "bom"),
          ("follow", "follows", "followed", "seku"), ("like", "likes", "liked", "amo"),
          ("watch", "watches", "watched", "lok"), ("help", "helps", "helped", "ayu"),
          ("call", "calls", "called", "voka"), ("wash", "washes", "washed", "lavo"))
_LOCATIONS = (("garden", "garun"), ("river", "sula"), ("forest", "miro"), ("village", "kamo"),
              ("market", "tarko"), ("hill", "bero"))
_PREPOSITIONS = (("in", "ri"), ("near", "pa"))


def _noun_phrase(rng: random.Random, nouns: tuple[tuple[str, str, str], ...], case: str) -> tuple[str, str, bool]:
  """(English, Veltan, plural) for "the [adjective] noun"."""
  singular, plural_form, stem = rng.choice(nouns)
  plural = rng.random() < 0.4
  english, veltan = plural_form if plural else singular, stem + ("ti" if plural else "") + case
  if rng.random() < 0.5:
    adjective, adjective_veltan = rng.choice(_ADJECTIVES)
    english, veltan = f"{adjective} {english}", f"{veltan} {adjective_veltan}"
  return f"the {english}", veltan, plural


def _translation_sample(rng: random.Random) -> Sample:
  subject, subject_veltan, plural = _noun_phrase(rng, _ANIMATES, "ka")
  obj, obj_veltan, _ = _noun_phrase(rng, _OBJECTS, "mo")
  base, third_person, past_form, stem = rng.choice(_VERBS)
  past = rng.random() < 0.5
  verb = past_form if past else base if plural else third_person
  english, veltan = [subject, verb, obj], [subject_veltan, obj_veltan, stem + ("ta" if past else "su")]
  if rng.random() < 0.5:
    (preposition, suffix), (place, place_veltan) = rng.choice(_PREPOSITIONS), rng.choice(_LOCATIONS)
    english.append(f"{preposition} the {place}")
    veltan.insert(0, place_veltan + suffix)
  sentence, translation = " ".join(english), " ".join(veltan)
  return Sample(f"Translate into Veltan: {sentence[0].upper()}{sentence[1:]}.",
                f"{translation[0].upper()}{translation[1:]}.", {})


# --- general instruction families: the alignment mix and the general-ability benchmarks --------------------

# Four families in the chat format, free of math and code and unlike the six tasks. The aligned base is trained
# on their train splits (the paper's alignment SFT) and fine-tuning mixes them 1:1 with task data. Their test
# splits stand in for the paper's general benchmarks (reading comprehension as TriviaQA, instruction following
# as IFEval, knowledge as MMLU) and are scored as the paper's MMLU, ARC and HellaSwag are: by the log-likelihood
# of each of four choices after the prompt, so a model that has lost a skill falls to chance (25%).

_COLOURED = ("ball", "cup", "hat", "box", "kite", "lamp", "door", "boat", "shoe", "bag", "coat", "chair")
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "grey", "orange")
N_CHOICES = 4


def _choices(rng: random.Random, answer: str, wrong: list[str]) -> dict:
  """The answer among N_CHOICES - 1 distinct wrong ones, in random order."""
  options = [answer] + rng.sample(sorted(set(wrong) - {answer}), N_CHOICES - 1)
  rng.shuffle(options)
  return {"choices": options, "answer": options.index(answer)}


def _recall_sample(rng: random.Random) -> Sample:
  objects = rng.sample(_COLOURED, rng.randint(2, 4))
  colours = [rng.choice(_COLOURS) for _ in objects]
  asked = rng.randrange(len(objects))
  facts = " ".join(f"The {o} is {c}." for o, c in zip(objects, colours))
  return Sample(f"Read the facts and answer. {facts} What colour is the {objects[asked]}?", colours[asked],
                _choices(rng, colours[asked], list(_COLOURS)))


_WORDS = ("river", "stone", "cloud", "apple", "music", "paper", "window", "garden", "silver", "candle", "forest",
          "pillow", "rocket", "tiger", "winter", "yellow", "dragon", "mirror", "pencil", "basket")


def _reverse_sample(rng: random.Random) -> Sample:
  words = rng.sample(_WORDS, rng.randint(3, 4))
  answer = " ".join(reversed(words))
  orders = {" ".join(rng.sample(words, len(words))) for _ in range(30)} | {" ".join(words)}
  return Sample(f"Write these words in reverse order: {' '.join(words)}", answer, _choices(rng, answer, list(orders)))


_CATEGORIES = {
    "an animal": ("horse", "rabbit", "eagle", "salmon", "monkey", "turtle"),
    "a fruit": ("mango", "banana", "cherry", "lemon", "peach", "grape"),
    "a tool": ("hammer", "shovel", "wrench", "saw", "drill", "ladder"),
    "a vehicle": ("truck", "bicycle", "tram", "canoe", "wagon", "scooter"),
    "a body part": ("elbow", "ankle", "shoulder", "knee", "finger", "ear"),
}


def _category_sample(rng: random.Random) -> Sample:
  wanted, *others = rng.sample(sorted(_CATEGORIES), N_CHOICES)
  options = [rng.choice(_CATEGORIES[c]) for c in [wanted] + others]
  listed = rng.sample(options, len(options))
  return Sample(f"Which of these words is {wanted}: {', '.join(listed)}?", options[0],
                {"choices": listed, "answer": listed.index(options[0])})


_OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"),
              ("light", "dark"), ("full", "empty"), ("open", "closed"), ("strong", "weak"), ("rich", "poor"),
              ("young", "old"), ("high", "low"), ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"),
              ("clean", "dirty"), ("near", "far"), ("thick", "thin"), ("sweet", "sour"), ("first", "last"))


def _opposite_sample(rng: random.Random) -> Sample:
  pairs = [p if rng.random() < 0.5 else p[::-1] for p in rng.sample(_OPPOSITES, 2)]
  answer = f"{pairs[0][1]}, {pairs[1][1]}"
  words = [w for pair in _OPPOSITES for w in pair]
  wrong = [f"{pairs[0][0]}, {pairs[1][1]}", f"{pairs[0][1]}, {pairs[1][0]}", f"{pairs[0][0]}, {pairs[1][0]}"]
  wrong += [f"{rng.choice(words)}, {rng.choice(words)}" for _ in range(6)]
  return Sample(f"Give the opposites of: {pairs[0][0]}, {pairs[1][0]}", answer, _choices(rng, answer, wrong))


# --- tasks ----------------------------------------------------------------------------------------------------

_GENERATORS: dict[str, Callable[[random.Random], Sample]] = {
    "math": _math_sample,
    "code": _code_sample,
    "intent": _intent_sample,
    "summary": _summary_sample,
    "law": _law_sample,
    "translation": _translation_sample,
    "recall": _recall_sample,
    "reverse": _reverse_sample,
    "category": _category_sample,
    "opposite": _opposite_sample,
}
# The paper's two groups: enhancement tasks adapt a skill the base has in part (its pretraining saw them),
# adaptation tasks teach one it lacks.
ENHANCEMENT_TASKS = ("math", "code")
ADAPTATION_TASKS = ("intent", "summary", "law", "translation")
TASK_NAMES = ENHANCEMENT_TASKS + ADAPTATION_TASKS
GENERAL_TASK_NAMES = ("recall", "reverse", "category", "opposite")
_METRICS = {name: name for name in TASK_NAMES} | {name: "choice" for name in GENERAL_TASK_NAMES}
# One prompt in this many belongs to the pretraining pool (by a hash of its text): the base's enhancement
# examples come from it and no task split does, whatever the seed.
_PRETRAINING_POOL_EVERY = 8
_MAX_MISSES = 2000  # draws in a row that only repeat prompts: the grammar is exhausted


def in_pretraining_pool(prompt: str) -> bool:
  return zlib.crc32(prompt.encode()) % _PRETRAINING_POOL_EVERY == 0


def _draw(name: str, rng: random.Random, n: int, taken: set[str], pretraining: bool = False) -> list[Sample]:
  """n samples whose prompts are new to `taken` (which is updated) and in the pretraining pool iff
  `pretraining`; raises if the grammar runs dry."""
  samples, misses = [], 0
  while len(samples) < n:
    sample = _GENERATORS[name](rng)
    prompt = user_piece(sample.question)
    if prompt in taken or in_pretraining_pool(prompt) != pretraining:
      misses += 1
      if misses > _MAX_MISSES:
        raise ValueError(f"task {name!r} gave only {len(samples)} new prompts of the {n} asked for before "
                         f"{_MAX_MISSES} draws in a row repeated old ones: its grammar is too small for that "
                         "many items; ask for fewer")
      continue
    misses = 0
    taken.add(prompt)
    samples.append(sample)
  return samples


def _train_record(sample: Sample) -> dict:
  return {"messages": [{"role": "user", "content": sample.question},
                       {"role": "assistant", "content": sample.answer}]}


def _test_record(sample: Sample) -> dict:
  """ESFT's evaluation format, or for a general family the multiple-choice format of `esft-jax eval --metric
  choice` ({"question", "choices", "answer": index})."""
  if "choices" in sample.extra:
    return {"question": user_piece(sample.question), **sample.extra}
  return {"prompt": user_piece(sample.question), "answers": [sample.answer], "raw_answers": [sample.answer],
          **sample.extra}


def _check_name(name: str) -> None:
  if name not in _GENERATORS:
    raise ValueError(f"unknown demo task {name!r}; choose one of {list(TASK_NAMES + GENERAL_TASK_NAMES)}")


def make_task(name: str, n_train: int, n_test: int, seed: int = 0) -> Task:
  """The task's test split (drawn first) and train split, with no prompt in both nor in the pretraining pool."""
  _check_name(name)
  rng, taken = random.Random(f"esft-demo/{name}/{seed}"), set()
  test = [_test_record(s) for s in _draw(name, rng, n_test, taken)]
  train = [_train_record(s) for s in _draw(name, rng, n_train, taken)]
  return Task(name, _METRICS[name], train, test, seed)


def make_all_tasks(n_train: int, n_test: int, seed: int = 0) -> dict[str, Task]:
  return {name: make_task(name, n_train, n_test, seed) for name in TASK_NAMES}


def make_general_tasks(n_train: int, n_test: int, seed: int = 0) -> dict[str, Task]:
  """The general instruction families: train splits for the alignment mix, test splits for general ability."""
  return {name: make_task(name, n_train, n_test, seed) for name in GENERAL_TASK_NAMES}


def pretraining_examples(name: str, k: int) -> list[dict]:
  """k training records of the task from the pretraining pool, the same for every seed: what the base model
  sees of an enhancement task before any fine-tuning."""
  _check_name(name)
  return [_train_record(s) for s in _draw(name, random.Random(f"esft-demo/{name}/pretraining"), k, set(),
                                          pretraining=True)]


def alignment_records(general: dict[str, Task]) -> list[dict]:
  """The alignment SFT's records: every general family's train split."""
  return [r for task in general.values() for r in task.train]


def alignment_mix(general: dict[str, Task], n: int, seed: int) -> list[dict]:
  """n records drawn evenly from the general families' train splits, shuffled: what fine-tuning mixes 1:1 with a
  task's data."""
  rng = random.Random(f"esft-demo/alignment-mix/{seed}")
  pool = alignment_records(general)
  if n > len(pool):
    raise ValueError(f"the alignment mix asks for {n} records but the general families hold {len(pool)}; "
                     "draw more general train items")
  return rng.sample(pool, n)
