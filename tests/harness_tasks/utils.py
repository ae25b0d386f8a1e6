"""Document functions for the local task YAMLs: the harness's own (lm_eval/tasks/winogrande/
preprocess_winogrande.py, lm_eval/tasks/hellaswag/utils.py, 0.4.13) and the conversions the local
files need (README.md beside this file)."""

import re


def winogrande_doc_to_text(doc):
    # partial scoring: the "text" is the gold choice's index, the choices are the contexts
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def preprocess(text):
    text = text.strip()
    # brackets are artifacts of the WikiHow part of HellaSwag
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_docs(dataset):
    # the local ctx is already "{activity_label}: {ctx_a} {ctx_b}" (ctx_b not capitalised)
    return dataset.map(
        lambda doc: {"query": preprocess(doc["ctx"]), "choices": [preprocess(e) for e in doc["endings"]]}
    )


def openbookqa_docs(dataset):
    def convert(doc):
        parts = re.split(r"\(([A-D])\)\s*", doc["Choices"])[1:]  # ["A", "text ", "B", "text ", ...]
        return {
            "question_stem": doc["Question Stem"],
            "choices": {"label": parts[0::2], "text": [p.strip() for p in parts[1::2]]},
            "answerKey": doc["Answer Key"],
        }

    return dataset.map(convert)


def wikitext_docs(dataset):
    # the local file holds WikiText-2's rows (lines), not the harness's whole pages: score the non-blank ones
    return dataset.filter(lambda doc: doc["text"].strip() != "")
