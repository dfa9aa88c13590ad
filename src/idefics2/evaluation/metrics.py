"""The field's answer metrics, each as its official definition computes it, one item at a time.

Every metric maps (prediction, references[, choices]) to a score in [0, 1]; a dataset's score is the mean.

- `vqa_accuracy`: VQAv2's accuracy, as the official evaluation script computes it
  (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, `processPunctuation`,
  `processDigitArticle` and the leave-one-out average in `evaluate`). Used for VQAv2, TextVQA, OK-VQA, VizWiz.
- `anls`: Average Normalized Levenshtein Similarity with tau = 0.5 (Biten et al., "Scene Text Visual Question
  Answering", ICCV 2019, section 4; the DocVQA / InfographicVQA challenges' metric, rrc.cvc.uab.es).
- `relaxed_accuracy`: ChartQA's relaxed accuracy (Masry et al., ChartQA, ACL Findings 2022, section 5: a
  numeric answer may be 5% off the reference; as `relaxed_correctness` in google-research's pix2struct,
  which the ChartQA numbers of Pix2Struct, MatCha, DePlot and later models are computed with).
- `multiple_choice`: the option the answer names, by letter or by text (`extract_choice`), against the
  reference option: MMBench / VLMEvalKit's matching without a judge model (VLMEvalKit's `can_infer_option`
  and `can_infer_text`).
- `exact_match`: equality after `normalize_exact`.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------- VQA accuracy
# The tables of vqaEval.py (the GT-Vision-Lab/VQA repository's current version), as data.
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")  # fmt: skip
_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# word -> its contracted spelling. The script lower-cases before the lookup, so its capitalised entries
# ("Im", "Ive", "Id've", "I'dve") never apply; they are left out. "somebody'd" -> "somebodyd" is the
# script's own (reversed) entry.
_VQA_CONTRACTIONS = dict(
    pair.split(">")
    for pair in """
    aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
    couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
    hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's howd>how'd
    howll>how'll hows>how's isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've itll>it'll let's>let's
    maam>ma'am mightnt>mightn't mightnt've>mightn't've mightn'tve>mightn't've mightve>might've
    mustnt>mustn't mustve>must've neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't
    ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've
    she's>she's shouldve>should've shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've
    somebody'd>somebodyd somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll
    somebodys>somebody's someoned>someone'd someoned've>someone'd've someone'dve>someone'd've
    someonell>someone'll someones>someone's somethingd>something'd somethingd've>something'd've
    something'dve>something'd've somethingll>something'll thats>that's thered>there'd thered've>there'd've
    there'dve>there'd've therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've
    theyll>they'll theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've
    weve>we've werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's
    whered>where'd wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll
    whos>who's whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've
    wouldnt>wouldn't wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll
    y'allll>y'all'll yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd
    youd've>you'd've you'dve>you'd've youll>you'll youre>you're youve>you've
    """.split()
)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The script's period pattern is "(?!<=\d)(\.)(?!\d)": its first group is a lookahead (not a lookbehind), so
# in effect a period goes unless a digit follows it ("2.5" stays, "dog." and "2." lose it). The script also
# passes re.UNICODE where `sub` takes its count, so at most 32 such periods are removed.
_LONE_PERIOD = re.compile(r"\.(?!\d)")
_VQA_PERIOD_LIMIT = 32


def normalize_vqa(text: str) -> str:
    """An answer as VQAv2's evaluation compares it: new lines and tabs become spaces, the ends are stripped,
    then `processPunctuation` (each punctuation mark is deleted where it touches a space or the text holds a
    digit-comma-digit such as "1,000", else replaced by a space; periods not followed by a digit go), then
    `processDigitArticle` (lower case, split on whitespace, number words zero..ten to digits, "none" to "0",
    articles a / an / the dropped, contractions written with their apostrophe: "dont" -> "don't")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # processPunctuation: every test is made on the input, every replacement on the running output
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or glued else " ")
    out = _LONE_PERIOD.sub("", out, count=_VQA_PERIOD_LIMIT)
    # processDigitArticle
    words = [_VQA_NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    words = [word for word in words if word not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy: min(#references equal to the answer / 3, 1), averaged over the leave-one-out subsets
    of the references (each subset leaves one reference out), after `normalize_vqa` on both sides.

    With VQAv2's ten references an answer that 1, 2, 3 or 4+ people gave scores 0.3, 0.6, 0.9 or 1.0. With
    fewer references the same formula runs over what there is (two references that both agree with the
    answer give 1/3: each subset holds one match); with a single reference there is no subset left, and the
    item scores 1 when the normalised answers are equal, else 0.

    The official script normalises only the answer fully: VQAv2's annotations come normalised, and the
    script re-applies only its punctuation step to them when they disagree. Here every reference gets the
    answer's normalisation, which leaves normalised annotations as they are and lets raw ones ("Two",
    "the dog.") match ("2", "dog")."""
    if not references:
        raise ValueError("VQA accuracy needs at least one reference answer")
    answer = normalize_vqa(prediction)
    matches = [normalize_vqa(reference) == answer for reference in references]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    # leaving out reference i leaves total - matches[i] matches among the others
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(matches)


# --------------------------------------------------------------------------------------------------- ANLS
ANLS_THRESHOLD = 0.5


def normalize_anls(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, the ends stripped (as the DocVQA evaluation)."""
    return " ".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions; one each) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:i] to every prefix of b
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one item: the best over the references of 1 - NL, where NL = Levenshtein(answer, reference) /
    max(their lengths) on `normalize_anls`'d strings; an NL at or above `threshold` (tau, 0.5) scores 0. Two
    empty strings are equal (NL = 0)."""
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    answer = normalize_anls(prediction)
    best = 0.0
    for reference in references:
        reference = normalize_anls(reference)
        longest = max(len(answer), len(reference))
        distance = levenshtein(answer, reference) / longest if longest else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


# -------------------------------------------------------------------------------------- relaxed accuracy
RELAXED_TOLERANCE = 0.05


def _relaxed_number(text: str) -> float | None:
    """The number a ChartQA answer states: Python's float() of it, "12%" as 0.12; None when it is not one
    ("1,000" is not: ChartQA's rule reads no thousands separators)."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(
    prediction: str, references: Sequence[str], tolerance: float = RELAXED_TOLERANCE
) -> float:
    """ChartQA's relaxed accuracy, the best over the references: when both the answer and a non-zero
    reference are numbers, correct if |answer - reference| / |reference| <= 5%; otherwise correct if they
    are equal as text, ignoring case (a reference of 0 is compared as text, as in the official rule). Both
    sides are stripped of surrounding whitespace first."""
    if not references:
        raise ValueError("relaxed accuracy needs at least one reference answer")
    answer = prediction.strip()
    answer_number = _relaxed_number(answer)
    for reference in references:
        reference = reference.strip()
        reference_number = _relaxed_number(reference)
        if answer_number is not None and reference_number:
            correct = abs(answer_number - reference_number) / abs(reference_number) <= tolerance
        else:
            correct = answer.lower() == reference.lower()
        if correct:
            return 1.0
    return 0.0


# ------------------------------------------------------------------------------------------- exact match
def normalize_exact(text: str) -> str:
    """Unicode NFKC, case folded, whitespace runs collapsed to one space, punctuation and whitespace at
    both ends removed ("  The Cat. " -> "the cat", "ＡＢＣ" -> "abc"); punctuation inside is kept ("3.5")."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge_junk(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1 when the answer equals any reference after `normalize_exact`, else 0."""
    if not references:
        raise ValueError("exact match needs at least one reference answer")
    answer = normalize_exact(prediction)
    return float(any(normalize_exact(reference) == answer for reference in references))


# ------------------------------------------------------------------------------------- multiple choice
def option_letters(count: int) -> str:
    """The option labels: A, B, C, ... (at most 26 options)."""
    if not 1 <= count <= len(string.ascii_uppercase):
        raise ValueError(f"a multiple-choice item needs 1 to 26 options, got {count}")
    return string.ascii_uppercase[:count]


def _phrase(text: str) -> str:
    """Text as option texts are compared: NFKC, case folded, non-alphanumeric runs as one space."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in folded).split())


def extract_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter an answer names, or None when it names none or several. The rule (VLMEvalKit's
    judge-free matching for MMBench, made precise):

    1. By letter: an answer that is only a letter, in either case ("b", "(B)"); else the answer's words
       (runs of letters and digits) that are one of the options' capital letters (A, B, ... for as many
       options as there are). If exactly one distinct letter appears, it is the answer: "B.", "Answer: B",
       "The answer is B, a cat" all name B. A capital "A" followed by a lower-case word other than "or" /
       "and" ("A cat sits") is the article, not a letter. Two or more letters name nothing.
    2. Otherwise by text: the options whose text (case folded, punctuation as spaces) occurs in the answer as
       whole words, leaving out an option whose text is part of another matching option's ("dark red" over
       "red"). If exactly one is left, it is the answer.
    3. Otherwise none: the item scores 0 (VLMEvalKit then asks a judge model; here nothing guesses).
    """
    letters = option_letters(len(choices))
    answer = _phrase(prediction)
    if len(answer) == 1 and answer.upper() in letters:  # the whole answer is a letter, in either case
        return answer.upper()
    named = set()
    for match in re.finditer(r"[^\W_]+", prediction):
        word = match.group()
        article = word == "A" and re.match(r"\s+(?!(?:or|and)\b)[a-z]", prediction[match.end() :])
        if len(word) == 1 and word in letters and not article:
            named.add(word)
    if named:
        return named.pop() if len(named) == 1 else None
    found = {letter: _phrase(text) for letter, text in zip(letters, choices, strict=True)}
    found = {letter: text for letter, text in found.items() if text and f" {text} " in f" {answer} "}
    kept = [
        letter
        for letter, text in found.items()
        if not any(text != other and f" {text} " in f" {other} " for other in found.values())
    ]
    return kept[0] if len(kept) == 1 else None


def reference_choice(reference: str, choices: Sequence[str]) -> str:
    """The option letter a reference answer names: an option letter ("B"), an option's text, or a 0-based
    option index ("1", as ScienceQA and AI2D on the hub write it), tried in that order. ValueError when it is
    none of them."""
    letters = option_letters(len(choices))
    text = reference.strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    by_text = [
        letter for letter, choice in zip(letters, choices, strict=True) if _phrase(choice) == _phrase(text)
    ]
    if len(by_text) == 1:
        return by_text[0]
    if text.isdigit() and int(text) < len(choices):
        return letters[int(text)]
    raise ValueError(
        f"the reference {reference!r} is neither an option letter, an option's text nor an index"
    )


def multiple_choice(prediction: str, references: Sequence[str], choices: Sequence[str] | None) -> float:
    """1 when the option the answer names (`extract_choice`) is the reference's (`reference_choice`, the
    first reference), else 0."""
    if not choices:
        raise ValueError("multiple choice needs the options (a `choices` column)")
    if not references:
        raise ValueError("multiple choice needs the reference answer")
    return float(extract_choice(prediction, choices) == reference_choice(references[0], choices))


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Metric:
    """A metric as `idefics2 eval` uses it: its `score` of one item, the rule set written into the summary,
    and the prompt template the field asks its questions with ({question}; {options}: "A. ...\\nB. ...")."""

    name: str
    title: str
    rules: str
    prompt_template: str
    score: Callable[[str, Sequence[str], Sequence[str] | None], float]
    needs_choices: bool = False


_SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."
METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(
            "vqa", "VQA accuracy",
            "VQAv2 vqaEval.py: punctuation, digit-comma and period rules, number words to digits, articles "
            "dropped, contractions; min(#matching references / 3, 1) averaged over the leave-one-out subsets "
            "(references normalised like the answer; one reference: exact match after normalisation)",
            _SHORT_ANSWER, lambda prediction, references, choices: vqa_accuracy(prediction, references),
        ),
        Metric(
            "anls", "ANLS",
            "ANLS, tau = 0.5: best over the references of 1 - normalised Levenshtein distance on "
            "lower-cased, whitespace-collapsed strings; 0 at or above tau",
            _SHORT_ANSWER, lambda prediction, references, choices: anls(prediction, references),
        ),
        Metric(
            "relaxed", "relaxed accuracy",
            "ChartQA relaxed accuracy: numbers (float(), 'N%' as N/100) within 5% of a non-zero reference, "
            "otherwise case-insensitive equality; best over the references",
            _SHORT_ANSWER, lambda prediction, references, choices: relaxed_accuracy(prediction, references),
        ),
        Metric(
            "exact", "exact match",
            "exact match after NFKC, case folding, whitespace collapsed, punctuation stripped at both ends; "
            "any reference",
            "{question}", lambda prediction, references, choices: exact_match(prediction, references),
        ),
        Metric(
            "mc", "multiple-choice accuracy",
            "multiple choice: the one option letter (A, B, ...) named as a word, else the one option "
            "text contained in the answer (longest match), else wrong; the reference is a letter, an "
            "option's text or a 0-based index",
            "{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
            multiple_choice, needs_choices=True,
        ),
    )
}  # fmt: skip


def format_options(choices: Sequence[str]) -> str:
    """The options as a multiple-choice prompt lists them: "A. red\\nB. blue"."""
    return "\n".join(
        f"{letter}. {text}" for letter, text in zip(option_letters(len(choices)), choices, strict=True)
    )
