"""The leaderboard's database: tables, the schema upgrade on start, API tokens and suite definitions.

Any SQLAlchemy URL works (SQLite by default, PostgreSQL for a shared server); a bare path means a
SQLite file. Tokens are random 256-bit strings stored only as their sha256 (a fast hash is enough
for secrets of that entropy). A suite is known by name and the sha256 of its canonical definition:
the built-in suites are registered on start, an admin may register more, and a submission's
averages are recomputed from the definition it names.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from clipsift import ClipsiftError
from clipsift.eval.registry import Suite, load_suite, parse_suite, suite_names

SCHEMA_VERSION = 1  # columns added since (nullable, added on start) need no new version
TOKEN_PREFIX = "clipsift_"
ROLES = ("admin", "submitter")
DEFAULT_DB = "leaderboard.sqlite"
LAST_USED_EVERY = timedelta(minutes=1)  # a token's last_used is written at most this often (one write a minute)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "clipsift_meta"
    key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    value: Mapped[str] = mapped_column(sa.Text)


class SuiteDef(Base):
    __tablename__ = "suites"
    __table_args__ = (sa.UniqueConstraint("name", "sha256"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), index=True)
    sha256: Mapped[str] = mapped_column(sa.String(64), index=True)
    definition: Mapped[dict] = mapped_column(sa.JSON)
    builtin: Mapped[bool] = mapped_column(default=False)
    created: Mapped[datetime] = mapped_column(default=utcnow)


class Token(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    role: Mapped[str] = mapped_column(sa.String(16))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # UTC; none: never
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)  # UTC; set by `token revoke`
    last_used: Mapped[datetime | None] = mapped_column(default=None)  # UTC, to LAST_USED_EVERY

    def refusal(self, now: datetime | None = None) -> str | None:
        """Why this token may not be used now (revoked, expired), or None when it may."""
        if self.revoked_at is not None:
            return f"token revoked on {show_time(self.revoked_at)}"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return f"token expired on {show_time(self.expires_at)}"
        return None


def show_time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


class Submission(Base):
    __tablename__ = "submissions"
    id: Mapped[int] = mapped_column(primary_key=True)
    track: Mapped[str] = mapped_column(sa.String(16), index=True)
    scale: Mapped[str] = mapped_column(sa.String(200), index=True)
    suite_name: Mapped[str] = mapped_column(sa.String(200), index=True)
    suite_sha256: Mapped[str] = mapped_column(sa.String(64))
    method_name: Mapped[str] = mapped_column(sa.String(200))
    authors: Mapped[list] = mapped_column(sa.JSON)
    links: Mapped[list] = mapped_column(sa.JSON)
    description: Mapped[str | None] = mapped_column(sa.Text)
    model: Mapped[dict] = mapped_column(sa.JSON)
    results: Mapped[list] = mapped_column(sa.JSON)  # [{"task", "metric", "value", "scored"}] in suite order
    average: Mapped[float] = mapped_column(index=True)  # recomputed by the server
    groups: Mapped[dict] = mapped_column(sa.JSON)  # {tag: value}, recomputed by the server
    subset_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    subset_size: Mapped[int | None] = mapped_column(sa.BigInteger)
    pool_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    run: Mapped[dict] = mapped_column(sa.JSON)  # run.json provenance: recipe, data, versions, ...
    non_standard: Mapped[dict] = mapped_column(sa.JSON)
    status: Mapped[str] = mapped_column(sa.String(16), index=True, default="pending")
    status_note: Mapped[str | None] = mapped_column(sa.Text)
    token_id: Mapped[int | None] = mapped_column(sa.ForeignKey("api_tokens.id"))
    fingerprint: Mapped[str] = mapped_column(sa.String(64), unique=True)  # (subset hash, scale, suite, results)
    created: Mapped[datetime] = mapped_column(default=utcnow)


def database_url(db: str) -> str:
    """An SQLAlchemy URL; a bare path is a SQLite file (its folder is made)."""
    if "://" in db:
        return db
    path = Path(db).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(connection: Any, record: Any) -> None:  # readers never wait for the writer
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")  # fsync at each commit: a commit survives power loss too
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)


def upgrade(engine: sa.Engine) -> None:
    """Create missing tables and add missing (nullable) columns, then record the schema version."""
    Base.metadata.create_all(engine)
    inspector = sa.inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable:
                    raise ClipsiftError(
                        f"table {table.name} lacks the required column {column.name}; "
                        "this database predates automatic upgrades: export its submissions and start a new one"
                    )
                kind = column.type.compile(engine.dialect)
                # PostgreSQL: IF NOT EXISTS, so two servers starting at once on an old database both succeed
                maybe = " IF NOT EXISTS" if engine.dialect.name == "postgresql" else ""
                connection.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN{maybe} "{column.name}" {kind}'))
        connection.execute(sa.delete(Meta.__table__).where(Meta.__table__.c.key == "schema_version"))
        connection.execute(sa.insert(Meta.__table__).values(key="schema_version", value=str(SCHEMA_VERSION)))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_definition(definition: dict[str, Any]) -> Suite:
    """The suite a definition describes; ValueError with the reason when it is not a valid one."""
    try:
        suite = parse_suite(definition)
    except ClipsiftError as err:
        raise ValueError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - any failure to read user input is a bad definition
        raise ValueError(f"{type(err).__name__}: {err}") from None
    if not suite.name or len(suite.name) > 200:
        raise ValueError("suite: the name must have 1 to 200 characters")
    return suite


class Database:
    """One leaderboard database: its engine, sessions, tokens and suite definitions."""

    def __init__(self, db: str = DEFAULT_DB):
        self.url = database_url(db)
        try:
            self.engine = make_engine(self.url)
            upgrade(self.engine)
        except sa.exc.SQLAlchemyError as err:
            raise ClipsiftError(
                f"cannot open the leaderboard database {sa.make_url(self.url).render_as_string(hide_password=True)}: "
                f"{type(err).__name__}: {str(err).splitlines()[0]}"
            ) from err
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self._suites: dict[str, Suite] = {}
        self.register_builtin_suites()

    def close(self) -> None:
        self.engine.dispose()

    # ----------------------------------------------------------------------- tokens

    def create_token(self, name: str, admin: bool = False, expires_at: datetime | None = None) -> str:
        """A new API token (returned once; only its hash is kept), valid until `expires_at` (UTC) if given."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.session.begin() as session:
            if session.scalar(sa.select(Token).where(Token.name == name)) is not None:
                raise ClipsiftError(f"a token named {name!r} exists already; choose another name")
            session.add(
                Token(
                    name=name,
                    token_hash=hash_token(token),
                    role="admin" if admin else "submitter",
                    expires_at=expires_at,
                )
            )
        return token

    def find_token(self, token: str) -> Token | None:
        """The token's row, revoked and expired ones included (`Token.refusal` tells whether it may be used)."""
        with self.session() as session:
            return session.scalar(sa.select(Token).where(Token.token_hash == hash_token(token)))

    def tokens(self) -> list[Token]:
        """Every token, oldest first (rows hold the hash: never show `token_hash`)."""
        with self.session() as session:
            return list(session.scalars(sa.select(Token).order_by(Token.created, Token.id)))

    def revoke_token(self, name: str) -> tuple[Token, bool]:
        """Revoke the token named `name` from now on (the server checks every request: no restart); returns it and
        whether it was revoked now (False: it was revoked already)."""
        with self.session.begin() as session:
            token = session.scalar(sa.select(Token).where(Token.name == name))
            if token is None:
                known = ", ".join(sorted(session.scalars(sa.select(Token.name)))) or "none"
                raise ClipsiftError(f"no token named {name!r} (tokens: {known})")
            if token.revoked_at is not None:
                return token, False
            token.revoked_at = utcnow()
        return token, True

    def touch_token(self, token: Token) -> None:
        """Record that `token` was used now, at most once per LAST_USED_EVERY (a write a minute, not per request)."""
        now = utcnow()
        if token.last_used is not None and now - token.last_used < LAST_USED_EVERY:
            return
        with self.session.begin() as session:
            session.execute(sa.update(Token).where(Token.id == token.id).values(last_used=now))

    # ----------------------------------------------------------------------- suites

    def register_builtin_suites(self) -> None:
        for name in suite_names():
            shipped = load_suite(name)
            definition = yaml.safe_load(Path(shipped.path).read_text(encoding="utf-8"))
            self.register_suite(definition, builtin=True, expect_sha256=shipped.sha256)

    def register_suite(
        self, definition: dict[str, Any], *, builtin: bool = False, expect_sha256: str | None = None
    ) -> tuple[SuiteDef, bool]:
        """Store a suite definition; returns it and whether it is new. Raises ValueError for a bad definition."""
        stored = json.loads(canonical_json(definition))  # exactly what the JSON column gives back
        suite = check_definition(stored)
        if expect_sha256 and suite.sha256 != expect_sha256:
            raise ClipsiftError(
                f"suite {suite.name}: its definition does not survive JSON storage unchanged "
                f"(sha256 {suite.sha256[:12]} after, {expect_sha256[:12]} before); keep the YAML to plain values"
            )
        with self.session() as session:
            existing = session.scalar(
                sa.select(SuiteDef).where(SuiteDef.name == suite.name, SuiteDef.sha256 == suite.sha256)
            )
            if existing is not None:
                return existing, False
            row = SuiteDef(name=suite.name, sha256=suite.sha256, definition=stored, builtin=builtin)
            session.add(row)
            try:
                session.commit()
            except sa.exc.IntegrityError:  # registered meanwhile by another process
                session.rollback()
                return session.scalar(
                    sa.select(SuiteDef).where(SuiteDef.name == suite.name, SuiteDef.sha256 == suite.sha256)
                ), False
            return row, True

    def suite(self, name: str, sha256: str) -> Suite | None:
        """The registered suite of that name and definition hash (parsed once, then cached)."""
        if sha256 not in self._suites:
            with self.session() as session:
                row = session.scalar(sa.select(SuiteDef).where(SuiteDef.sha256 == sha256))
            if row is None:
                return None
            self._suites[sha256] = parse_suite(row.definition)
        suite = self._suites[sha256]
        return suite if suite.name == name else None

    def suites(self) -> list[SuiteDef]:
        with self.session() as session:
            return list(session.scalars(sa.select(SuiteDef).order_by(SuiteDef.name, SuiteDef.created)))
