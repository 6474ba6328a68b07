"""evaluation.generation's scores on hand-made answers: corpus BLEU and chrF can
fall while the answers got short and closer to their references; the length
ratio, BLEU's brevity penalty, each answer's chrF1 and the wins count say so,
and `kubetune run`'s summary puts that in words under the table."""

from __future__ import annotations

import json
import math

import pytest

from kubetune_trainer import evalgen as G
from kubetune_trainer.storage import JobStorage

# A base model that rambles (and, once, repeats a long reference almost whole),
# and a fine-tuned one that answers short, in the references' style.
REFS = [
    "Here is a queue: from collections import deque; q = deque(); q.append(1); q.popleft()",
    "Prunes.",
    "Try another USB port.",
]
BEFORE = [
    "Sure! Here is a queue: from collections import deque; q = deque(); q.append(1); "
    "q.popleft() and so on, for as long as you like, with as many items as you like.",
    "The common name for dried plums is prunella in botany, and in the shops they are "
    "sold as dried fruit.",
    "I am sorry to hear that your mouse is not working. You could restart the computer "
    "or buy a new one.",
]
AFTER = ["Use a deque from collections.", "Prunes.", "Try another port."]
# BLEU's tokens (13a: words and punctuation marks apart), e.g. "Prunes ." is 2:
REF_TOKENS = 28 + 2 + 5
BEFORE_TOKENS = 49 + 22 + 23
AFTER_TOKENS = 6 + 2 + 4


def test_short_close_answers_lose_bleu_and_chrf_but_win_per_answer():
    before, after = G.score(BEFORE, REFS), G.score(AFTER, REFS)
    # the corpus scores read "worse": the rambling copy of the long reference
    # carries them, and the short answers pay BLEU's brevity penalty
    assert before["bleu"] == pytest.approx(30.12, abs=0.01)
    assert after["bleu"] == pytest.approx(3.16, abs=0.01)
    assert before["chrf"] == pytest.approx(59.62, abs=0.01)
    assert after["chrf"] == pytest.approx(37.18, abs=0.01)
    # what happened: from 2.7x the references' length to a third of it ...
    assert before["length_ratio"] == pytest.approx(BEFORE_TOKENS / REF_TOKENS)
    assert after["length_ratio"] == pytest.approx(AFTER_TOKENS / REF_TOKENS)
    # ... which BLEU penalises: exp(1 - reference length / answer length) when shorter
    assert before["brevity_penalty"] == 1.0
    assert after["brevity_penalty"] == pytest.approx(math.exp(1 - REF_TOKENS / AFTER_TOKENS))
    # BLEU without its penalty (its n-gram precisions alone) fell far less
    assert after["bleu"] / after["brevity_penalty"] == pytest.approx(21.46, abs=0.01)
    # and per answer, with precision and recall weighted equally, two came closer
    b, a = G.chrf1(BEFORE, REFS), G.chrf1(AFTER, REFS)
    assert a[1] == 100.0 and b[1] < 5.0  # "Prunes." exactly
    assert a[2] > b[2] and a[0] < b[0]  # the short queue answer lost the code
    assert G.after_vs_before(b, a, "chrf1") == {"by": "chrf1", "wins": 2, "ties": 0, "losses": 1}
    assert before["chrf1"] == pytest.approx(sum(b) / 3)
    assert after["chrf1"] == pytest.approx(sum(a) / 3)
    assert after["chrf1"] > 2 * before["chrf1"]
    assert (before["exact_match"], after["exact_match"]) == (0.0, pytest.approx(1 / 3))


def test_chrf1_does_not_reward_an_answer_for_burying_the_reference():
    import sacrebleu

    ref = ["Try another USB port."]
    buried, short = "Sorry about that! Try another USB port.", "Use another USB port."
    # sacrebleu's chrF (beta 2) counts recall twice: the buried reference wins on it ...
    assert sacrebleu.sentence_chrf(buried, ref).score == pytest.approx(83.70, abs=0.01)
    assert sacrebleu.sentence_chrf(short, ref).score == pytest.approx(80.41, abs=0.01)
    # ... and loses on chrF1, where the words around it cost as much as missing ones
    assert G.chrf1([buried, short], ref * 2) == [
        pytest.approx(67.25, abs=0.01),
        pytest.approx(80.41, abs=0.01),
    ]
    assert G.chrf1(ref, ref) == [100.0]


def test_after_vs_before_counts_ties_and_keeps_the_order():
    assert G.after_vs_before([1.0, 0.5, 0.2, 0.0], [1.0, 0.7, 0.1, 0.0], "reward") == {
        "by": "reward",
        "wins": 1,
        "ties": 2,
        "losses": 1,
    }
    assert G.after_vs_before([], [], "chrf1") == {"by": "chrf1", "wins": 0, "ties": 0, "losses": 0}
    with pytest.raises(ValueError):
        G.after_vs_before([1.0], [], "chrf1")


def test_summary_says_what_happened_under_the_table(tmp_path):
    storage = JobStorage(str(tmp_path))
    b, a = G.chrf1(BEFORE, REFS), G.chrf1(AFTER, REFS)
    rows = [
        {"split": "validation", "prompt": "q", "reference": r, "before": x, "after": y}
        | {"chrf1_before": cb, "chrf1_after": ca}
        for r, x, y, cb, ca in zip(REFS, BEFORE, AFTER, b, a, strict=True)
    ]
    (tmp_path / G.SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = {
        "generation": {
            "examples": {"validation": 3},
            "validation_before": G.score(BEFORE, REFS),
            "validation_after": G.score(AFTER, REFS),
            "validation_after_vs_before": G.after_vs_before(b, a, "chrf1"),
        }
    }
    # as outputs.json holds it: keys sorted; the table keeps its reading order
    outputs = json.loads(json.dumps(outputs, sort_keys=True))
    text = "\n".join(G.summary_lines(outputs, storage))
    table = [line.split()[0] for line in text.splitlines() if line.startswith("    ")]
    assert table == list(G.ROWS)
    assert "    length_ratio                   2.686    0.343" in text
    assert "length: the answers are 2.69x the references' before, 0.34x after" in text
    closer = "2 of 3 answers are closer to their reference (by chrF1), 1 further, 0 the same"
    assert f"after training {closer}" in text
    assert "  after:     Prunes.  (chrF1 100.0)" in text
    # a job finished before these were kept still prints its table and samples
    for row in rows:
        del row["chrf1_before"], row["chrf1_after"]
    (tmp_path / G.SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for when in ("before", "after"):
        for key in ("brevity_penalty", "chrf1", "length_ratio"):
            del outputs["generation"][f"validation_{when}"][key]
    del outputs["generation"]["validation_after_vs_before"]
    old = "\n".join(G.summary_lines(outputs, storage))
    assert "    chrf " in old and "length:" not in old and "closer" not in old
    assert "  after:     Prunes.\n" in old + "\n"


def test_summary_counts_higher_rewards_for_prompt_rows(tmp_path):
    versus = G.after_vs_before([0.0, 0.5, 1.0, 0.5], [1.0, 1.0, 1.0, 0.0], "reward")
    outputs = {
        "generation": {
            "examples": {"validation": 4},
            "validation_before": {"reward": 0.5},
            "validation_after": {"reward": 0.75},
            "validation_after_vs_before": versus,
        }
    }
    text = "\n".join(G.summary_lines(outputs, JobStorage(str(tmp_path))))
    assert "after training 2 of 4 answers score a higher reward, 1 lower, 1 the same" in text
    assert "length:" not in text
