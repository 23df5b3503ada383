"""Exact-match accuracy, split into retrieval (the query is a support input) and generalization."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueryResult:
    input: str
    target: str
    prediction: str
    retrieval: bool  # the query's input is one of the episode's support inputs

    @property
    def correct(self) -> bool:
        return self.prediction == self.target


def accuracy(results: list[QueryResult]) -> float | None:
    """Percent of exactly right outputs; None (reported as null) for an empty group, never NaN."""
    return 100.0 * sum(r.correct for r in results) / len(results) if results else None


def score_queries(results: list[QueryResult]) -> dict:
    retrieval = [r for r in results if r.retrieval]
    generalization = [r for r in results if not r.retrieval]
    return {"accuracy": accuracy(results), "n": len(results),
            "retrieval": accuracy(retrieval), "n_retrieval": len(retrieval),
            "generalization": accuracy(generalization), "n_generalization": len(generalization)}


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def score_episodes(per_episode: list[list[QueryResult]]) -> dict:
    """Each episode scored on its own, then averaged over episodes (as the original's validation)."""
    scores = [score_queries(results) for results in per_episode]
    return {key: mean_or_none(s[key] for s in scores) for key in ("accuracy", "retrieval", "generalization")} | {
        "n_episodes": len(scores), "episodes": scores}
