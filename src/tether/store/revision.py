"""The schema revision this code expects: Alembic's head.

Kept here, so that finding a database already at head needs neither Alembic nor
SQLAlchemy (a server that never migrates never loads them: a fifth of its memory).
tests/migrations checks that it names Alembic's head.
"""

HEAD = "0003"
