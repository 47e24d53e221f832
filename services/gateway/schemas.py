"""Request and response models of the gateway, one pair per resource."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.snapshot import StudySnapshot


class ErrorPublic(BaseModel):
    detail: str


class ParamPublic(BaseModel):
    name: str
    low: float
    high: float


class ModelSummary(BaseModel):
    name: str
    version: int
    problem: str
    architecture: str
    validation_error: float | None
    samples_seen: int


class ModelCardPublic(BaseModel):
    name: str
    version: int
    problem: dict[str, Any]
    parameters: list[ParamPublic]
    time_range: tuple[float, float]
    architecture: dict[str, Any]
    input_shape: list[int]
    output_shape: list[int]
    fields: list[str]
    samples_seen: int
    train_steps: int
    validation_error: float | None
    created_at: float
    study_id: str | None
    ensemble: dict[str, Any] | None = Field(
        None,
        description="an ensemble's members, std_scale and calibration: the fractions of held-out errors within "
        "1 and 2 standard deviations (within_1sigma, within_2sigma)",
    )


class VersionPublic(BaseModel):
    version: int
    study_id: str | None
    validation_error: float | None
    validation_set: str | None = Field(description="fingerprint of the validation simulations: errors compare if equal")
    train_steps: int
    samples_seen: int
    created_at: float
    served: bool


class VersionList(BaseModel):
    name: str
    served: int | None = Field(description="the version predictions use unless they pin one")
    versions: list[VersionPublic]


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="a published version of the model")


class PromoteResponse(BaseModel):
    name: str
    served: int
    previous: int | None


class ModelList(BaseModel):
    models: list[ModelSummary]


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: dict[str, FiniteFloat] = Field(description="one value per parameter of the model, by name")
    times: list[FiniteFloat] = Field(min_length=1, description="physical times at which to predict the fields")


class OperatorPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(description="each input field by name: an array [*grid] or a batch [N, *grid]")
    params: dict[str, FiniteFloat] = Field(default_factory=dict, description="the model's scalar parameters, if any")


class PredictResponse(BaseModel):
    model: str
    version: int
    shape: list[int]
    outputs: list[Any] = Field(description="the predicted fields [N, C_out, *grid] (an ensemble's mean)")
    std: list[Any] | None = Field(
        None, description="an ensemble's calibrated standard deviation of every output value, shaped like outputs"
    )
    ensemble: int | None = Field(None, description="an ensemble's members (absent for a single model)")
    source: Literal["surrogate", "solver"] | None = Field(
        None, description="with fallback=solve: who answered (the solver's std is 0)"
    )
    simulation: int | None = Field(None, description="source solver: the study's id of the simulation it ran")


# A study as the API shows it: the snapshot its driver reports (one layout for file, metrics, CLI, API).
StudyPublic = StudySnapshot


class StudyList(BaseModel):
    studies: list[StudyPublic]


class Health(BaseModel):
    status: str
    models: list[str]
    studies_enabled: bool


# OpenAPI pieces the routes declare their answers with -------------------------------------------------

WWW_AUTHENTICATE = {
    "WWW-Authenticate": {
        "description": "the scheme to authenticate with",
        "required": True,
        "schema": {"type": "string"},
    }
}


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``responses=`` entry for an error answer: JSON ``{"detail": str}`` saying what is wrong."""
    return {"model": ErrorPublic, "description": description, **({"headers": headers} if headers else {})}


# The answers of a route behind the admin token (``TokenDep``).
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: error("the admin token (SURGE_API_TOKEN) is missing or wrong", WWW_AUTHENTICATE),
    403: error("the gateway has no admin token: promotion and study mutations are disabled"),
}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` written in place (models without recursive references), for
    an ``openapi_extra`` request body: there a ``#/$defs/...`` reference would be resolved against the OpenAPI
    document and point nowhere."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
