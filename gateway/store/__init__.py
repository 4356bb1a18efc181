"""Storage shell: SQLAlchemy 2 engine factory, the one transaction pattern, and
Alembic migrations. SQLite is the embedded default, PostgreSQL the production store.
"""

from gateway.store.db import Database, open_database

__all__ = ["Database", "open_database"]
