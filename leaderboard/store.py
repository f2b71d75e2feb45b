"""Storing and reading submissions: the one code path the HTTP API and `post_local` share."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from clipsift.leaderboard.db import Database, Submission
from clipsift.leaderboard.schema import Duplicate, SubmissionIn
from clipsift.leaderboard.verify import Verified, check_submission, fingerprint, parse_payload

LISTED = (
    Submission.id,
    Submission.method_name,
    Submission.authors,
    Submission.track,
    Submission.scale,
    Submission.suite_name,
    Submission.suite_sha256,
    Submission.status,
    Submission.average,
    Submission.groups,
    Submission.subset_size,
    Submission.created,
)
VISIBLE = ("pending", "verified")  # what the leaderboard lists by default; rejected submissions stay reachable by id


def add_submission(db: Database, submission: SubmissionIn, token_id: int | None = None) -> Submission:
    """Verify a parsed submission against its registered suite and store it (status pending)."""
    suite, verified = check_submission(submission, db)
    existing = find_duplicate(db, submission, suite.sha256, verified)
    if existing is not None:
        raise Duplicate(existing)
    row = Submission(
        track=submission.track,
        scale=submission.scale,
        suite_name=suite.name,
        suite_sha256=suite.sha256,
        method_name=submission.method_name,
        authors=submission.authors,
        links=submission.links,
        description=submission.description,
        model=submission.model.model_dump(),
        results=verified.results,
        average=verified.average,
        groups=verified.groups,
        subset_sha256=submission.subset.sha256 if submission.subset else None,
        subset_size=submission.subset.size if submission.subset else None,
        pool_sha256=submission.pool_sha256,
        run=submission.run.model_dump(),
        non_standard=verified.non_standard,
        status="pending",
        token_id=token_id,
        fingerprint=verified.fingerprint,
    )
    with db.session() as session:
        session.add(row)
        try:
            session.commit()
        except sa.exc.IntegrityError:
            session.rollback()
            first = session.scalar(sa.select(Submission.id).where(Submission.fingerprint == verified.fingerprint))
            if first is None:
                raise
            raise Duplicate(first) from None
    return row


def find_duplicate(db: Database, submission: SubmissionIn, suite_sha256: str, verified: Verified) -> int | None:
    """The first stored submission that is the same entry (`verify.fingerprint`), recomputed from the stored rows of
    the same track, scale, suite and subset: rows stored before the fingerprint's current rules count too. The
    unique fingerprint column still refuses two concurrent new submissions."""
    subset = submission.subset.sha256 if submission.subset else None
    query = sa.select(Submission.id, Submission.description, Submission.results).where(
        Submission.track == submission.track,
        Submission.scale == submission.scale,
        Submission.suite_sha256 == suite_sha256,
        Submission.subset_sha256 == subset if subset is not None else Submission.subset_sha256.is_(None),
    )
    with db.session() as session:
        for row in session.execute(query.order_by(Submission.id)):
            stored = fingerprint(
                track=submission.track,
                scale=submission.scale,
                suite_sha256=suite_sha256,
                subset_sha256=subset,
                description=row.description,
                results=row.results,
            )
            if stored == verified.fingerprint:
                return row.id
    return None


def post_local(db_url: str, payload: dict[str, Any]) -> int:
    """Verify and store a submission payload straight into a database (no server); its id.

    Raises `Rejected` (a ClipsiftError) with the reasons when the submission is refused, `Duplicate` (a `Rejected`
    naming the `existing` submission) when the same subset, scale and results are stored already.
    """
    submission = parse_payload(payload)
    db = Database(db_url)
    try:
        return add_submission(db, submission).id
    finally:
        db.close()


def leaderboard(
    db: Database,
    *,
    scale: str | None = None,
    track: str | None = None,
    suite: str | None = None,
    statuses: tuple[str, ...] = VISIBLE,
) -> list[sa.Row]:
    """Submissions that match (the LISTED columns), best average first (ties: earlier first)."""
    query = sa.select(*LISTED).where(
        Submission.status.in_(statuses)
    )  # plain rows: no ORM objects, no provenance columns
    for column, value in ((Submission.scale, scale), (Submission.track, track), (Submission.suite_name, suite)):
        if value is not None:
            query = query.where(column == value)
    with db.session() as session:
        return list(session.execute(query.order_by(Submission.average.desc(), Submission.id)))


def boards(db: Database) -> list[tuple[str, str, str, int]]:
    """(scale, track, suite, count) of every leaderboard that has visible submissions."""
    query = (
        sa.select(Submission.scale, Submission.track, Submission.suite_name, sa.func.count())
        .where(Submission.status.in_(VISIBLE))
        .group_by(Submission.scale, Submission.track, Submission.suite_name)
        .order_by(Submission.scale, Submission.track, Submission.suite_name)
    )
    with db.session() as session:
        return [tuple(row) for row in session.execute(query)]


def get_submission(db: Database, submission_id: int) -> Submission | None:
    with db.session() as session:
        return session.get(Submission, submission_id)


def set_status(db: Database, submission_id: int, status: str, note: str | None = None) -> Submission | None:
    with db.session.begin() as session:
        row = session.get(Submission, submission_id)
        if row is not None:
            row.status, row.status_note = status, note
    return row
