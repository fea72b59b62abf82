from sqlalchemy import text

from asyncpatterns.db import make_session_maker
from asyncpatterns.models import User
from asyncpatterns.sqlwatch import watch_sql


async def test_counts_statements_and_parameter_sets(engine) -> None:
    async with engine.begin() as conn:
        with watch_sql(engine) as sql:
            await conn.execute(text("SELECT 1"))
            await conn.execute(
                User.__table__.insert(),
                [{"name": f"n{i}", "email": f"e{i}@x.io", "is_active": True} for i in range(3)],
            )
    assert sql.count >= 2
    assert sql.first_words(1)[0] == "SELECT"
    assert sql.parameter_sets >= 2


async def test_ignores_transaction_control_and_stops_after_the_block(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        with watch_sql(engine) as sql:
            session.add(User(name="a", email="a@x.io"))
            await session.commit()
        await session.get(User, 1)
    assert sql.count == 1
    assert sql.first_words(2) == ["INSERT INTO"]
