"""Plugin registries: environments and sandbox backends, registered by id.

Entries are lazy: a spec holds a `"module:Attr"` string (or the object itself) and nothing is
imported until `make` is called. Third-party packages add entries through entry points:

    [project.entry-points."spo_agents.envs"]
    my-env-v0 = "my_pkg.env:MyEnv"

    [project.entry-points."spo_agents.sandboxes"]
    my-backend = "my_pkg.sandbox:MyBackend"

Environment ids are versioned (`math-python-v0`); an id without a version (`math-python`)
means the highest registered version, and `package.module:EnvClass` names an environment class
directly (not registered, imported on `make`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from spo_agents.errors import EnvError, EnvNotFound, SandboxNotFound, SPOError, did_you_mean

_VERSIONED = re.compile(r"^(?P<name>.+)-v(?P<version>\d+)$")


@dataclass
class Spec:
    """A registered entry."""

    id: str
    entry_point: str | Callable[..., Any]
    description: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = "built-in"  # or the distribution that declared the entry point

    def load(self) -> Any:
        """Import and return the registered object (class or factory)."""
        if not isinstance(self.entry_point, str):
            return self.entry_point
        module_name, sep, attr = self.entry_point.partition(":")
        if not sep or not module_name or not attr:
            raise EnvError(f"entry point `{self.entry_point}` of `{self.id}` must look like `package.module:ClassName`")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise EnvError(f"cannot import `{module_name}` for `{self.id}` (from {self.source}): {e}") from e
        obj = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError as e:
                raise EnvError(
                    f"`{module_name}` has no attribute `{attr}` (entry point of `{self.id}`, from {self.source})"
                ) from e
        return obj


class Registry:
    """Ids to specs, with entry-point discovery and version resolution."""

    def __init__(
        self,
        kind: str,
        group: str,
        not_found: type[SPOError],
        list_command: str,
        builtins: Callable[[], None] | None = None,
        validate: Callable[[Spec, Any], None] | None = None,
        import_paths: bool = False,
    ) -> None:
        self.kind = kind
        self.group = group
        self._not_found = not_found
        self._list_command = list_command
        self._builtins = builtins
        self._validate = validate
        self._import_paths = import_paths
        self._specs: dict[str, Spec] = {}
        self._loaded = False

    def register(
        self,
        id: str,
        entry_point: str | Callable[..., Any],
        *,
        description: str = "",
        kwargs: dict[str, Any] | None = None,
        source: str = "built-in",
        override: bool = False,
    ) -> Spec:
        if id in self._specs and not override:
            raise SPOError(
                f"{self.kind} `{id}` is already registered (from {self._specs[id].source}); "
                "pass override=True to replace it"
            )
        spec = Spec(id=id, entry_point=entry_point, description=description, kwargs=dict(kwargs or {}), source=source)
        self._specs[id] = spec
        return spec

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._builtins is not None:
            self._builtins()
        for ep in entry_points(group=self.group):
            if ep.name in self._specs:
                continue  # built-ins and explicit registrations win
            dist = getattr(ep, "dist", None)
            source = f"package `{dist.name}`" if dist is not None else "an entry point"
            self._specs[ep.name] = Spec(id=ep.name, entry_point=ep.value, source=source)

    def resolve(self, id: str) -> str:
        """Return the registered id `id` refers to (`name` -> highest `name-vN`)."""
        self._ensure_loaded()
        if id in self._specs:
            return id
        versions = []
        for sid in self._specs:
            m = _VERSIONED.match(sid)
            if m and m.group("name") == id:
                versions.append((int(m.group("version")), sid))
        if versions:
            return max(versions)[1]
        names = list(self._specs) + sorted({m.group("name") for s in self._specs if (m := _VERSIONED.match(s))})
        raise self._not_found(
            f"no {self.kind} is registered as `{id}`.{did_you_mean(id, names)} "
            f"Run `{self._list_command}` to see what is available."
        )

    def spec(self, id: str) -> Spec:
        """The spec of `id`; with `import_paths`, `package.module:Attr` gives an unregistered one."""
        if self._import_paths and ":" in id and id not in self._specs:
            return Spec(id=id, entry_point=id, source="an import path")
        return self._specs[self.resolve(id)]

    def load(self, id: str) -> tuple[Spec, Any]:
        """Resolve `id`, import its entry point and validate it; returns (spec, object)."""
        spec = self.spec(id)
        obj = spec.load()
        if self._validate is not None:
            self._validate(spec, obj)
        return spec, obj

    def make(self, id: str, **kwargs: Any) -> Any:
        spec, obj = self.load(id)
        return obj(**{**spec.kwargs, **kwargs})

    def list(self) -> list[Spec]:
        self._ensure_loaded()
        return [self._specs[k] for k in sorted(self._specs)]

    def __contains__(self, id: str) -> bool:
        try:
            self.resolve(id)
        except self._not_found:
            return False
        return True


def describe(spec: Spec) -> str:
    """One-line description: the registered one, else the first docstring line of the object."""
    if spec.description:
        return spec.description
    try:
        obj = spec.load()
    except SPOError as e:
        return f"(cannot load: {e})"
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


# --- environments ---------------------------------------------------------------------------
def _register_builtin_envs() -> None:
    importlib.import_module("spo_agents.envs")  # registers the built-ins on import


def env_requirement(spec: Spec) -> str:
    """What an environment plugin must be (used in every error about a bad plugin)."""
    return (
        f"`{spec.id}` (from {spec.source}, entry point `{spec.entry_point}`) must be a subclass of "
        f"`gymnasium.Env` (for text environments, `spo_agents.envs.MultiTurnEnv`) or a factory that returns "
        f"an instance of one"
    )


def _validate_env(spec: Spec, obj: Any) -> None:
    import gymnasium

    if isinstance(obj, type) and not issubclass(obj, gymnasium.Env):
        raise EnvError(
            f"{env_requirement(spec)}; it points to the class `{obj.__module__}.{obj.__qualname__}`, which is not one"
        )
    if not callable(obj):
        raise EnvError(f"{env_requirement(spec)}; it points to {obj!r}")


ENVS = Registry(
    kind="environment",
    group="spo_agents.envs",
    not_found=EnvNotFound,
    list_command="spo-agent envs",
    builtins=_register_builtin_envs,
    validate=_validate_env,
    import_paths=True,
)


# --- sandboxes ------------------------------------------------------------------------------
def _register_builtin_sandboxes() -> None:
    importlib.import_module("spo_agents.sandboxes")


SANDBOXES = Registry(
    kind="sandbox backend",
    group="spo_agents.sandboxes",
    not_found=SandboxNotFound,
    list_command="spo-agent sandbox list",
    builtins=_register_builtin_sandboxes,
)
