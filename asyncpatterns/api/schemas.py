"""What the API accepts and answers, beside the models' UserCreate / UserRead / UserUpdate.

Use these as the endpoints' parameter and return types: FastAPI checks the
input against them before any SQL runs, and documents them in OpenAPI.
Without the bounds, the common pattern's ``?limit=-1`` or a huge page was a
500 or a silent dump of the table; here it is a 422 that names the parameter,
as is an id past the 32-bit INTEGER columns.
"""

from decimal import Decimal
from typing import Annotated, Literal

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Strict, field_validator, model_validator
from sqlmodel import Field, SQLModel

from .. import crud
from ..models import CENT, MAX_ID, TEXT_PATTERN, UserRead, checked_name
from ..pagination import MAX_CURSOR_LENGTH

# -- Parameters: ids fit the 32-bit INTEGER columns, pages are bounded ---------

UserId = Annotated[int, Path(ge=1, le=MAX_ID)]
TeamId = Annotated[int, Path(ge=1, le=MAX_ID)]
AccountId = Annotated[int, Path(ge=1, le=MAX_ID)]
Skip = Annotated[int, Query(ge=0, le=MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=crud.MAX_PAGE_SIZE)]
Cursor = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_CURSOR_LENGTH,
        description='A page\'s place: take it from the Link header\'s rel="next" or rel="prev".',
    ),
]
UserSort = Annotated[
    Literal["id", "name"], Query(description="The order of the pages (ties by id).")
]


# -- Schemas the endpoints add to the models' ---------------------------------


class ErrorMessage(BaseModel):
    detail: str


class Deleted(BaseModel):
    ok: bool


class TeamCreate(SQLModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=100, schema_extra={"pattern": TEXT_PATTERN})

    @field_validator("name")
    @classmethod
    def _canonical_name(cls, name: str) -> str:
        return checked_name(name)


class TeamRead(SQLModel):
    id: int
    name: str
    members: list[UserRead]


class AccountCreate(SQLModel):
    # Not strict: JSON has no decimal type, so 12.5 and "12.50" are both accepted.
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1, max_length=100, schema_extra={"pattern": TEXT_PATTERN})
    balance: Decimal = Field(ge=0, max_digits=15, decimal_places=2)

    @field_validator("owner")
    @classmethod
    def _canonical_owner(cls, owner: str) -> str:
        return checked_name(owner)

    @field_validator("balance")
    @classmethod
    def _whole_cents(cls, balance: Decimal) -> Decimal:
        # 0.1 -> 0.10, as it will be stored; and -0 is 0 (the database has one zero)
        return balance.quantize(CENT) or Decimal("0.00")


class AccountRead(SQLModel):
    id: int
    owner: str
    balance: Decimal


class TransferCreate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # not strict, for the amount (see above)

    from_id: Annotated[int, Strict()] = Field(ge=1, le=MAX_ID)
    to_id: Annotated[int, Strict()] = Field(ge=1, le=MAX_ID)
    amount: Decimal = Field(gt=0, max_digits=15, decimal_places=2)

    @model_validator(mode="after")
    def _two_accounts(self) -> "TransferCreate":
        if self.from_id == self.to_id:
            raise ValueError("from_id and to_id must be different accounts")
        return self


class TransferRead(SQLModel):
    from_account: AccountRead
    to_account: AccountRead
