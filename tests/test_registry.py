"""The generic plugin registry: versions, lazy entry points, suggestions, validation."""

import pytest

from spo_agents.errors import EnvError, EnvNotFound, SandboxNotFound
from spo_agents.registry import Registry, describe


class Thing:
    """A thing for tests."""

    def __init__(self, size=1):
        self.size = size


def make_registry(validate=None):
    return Registry(
        kind="thing",
        group="spo_agents.tests-nothing",
        not_found=EnvNotFound,
        list_command="spo-agent things",
        validate=validate,
    )


def test_unversioned_id_resolves_to_latest_version():
    r = make_registry()
    r.register("box-v0", Thing)
    r.register("box-v2", Thing)
    r.register("box-v10", Thing)
    assert r.resolve("box") == "box-v10"
    assert r.resolve("box-v2") == "box-v2"


def test_unknown_id_suggests_nearest_and_the_list_command():
    r = make_registry()
    r.register("math-python-v0", Thing)
    with pytest.raises(EnvNotFound) as e:
        r.make("math-pyton")
    msg = str(e.value)
    assert "Did you mean `math-python`?" in msg
    assert "spo-agent things" in msg


def test_lazy_string_entry_point_is_imported_on_make():
    r = make_registry()
    r.register("thing-v0", f"{__name__}:Thing", kwargs={"size": 3})
    obj = r.make("thing", size=5)
    assert isinstance(obj, Thing) and obj.size == 5
    assert r.make("thing").size == 3


def test_bad_entry_point_says_what_is_required():
    r = make_registry()
    r.register("broken-v0", "no_such_module_xyz:Env")
    with pytest.raises(EnvError, match="cannot import `no_such_module_xyz`"):
        r.make("broken")
    r.register("malformed-v0", "just_a_module")
    with pytest.raises(EnvError, match="package.module:ClassName"):
        r.make("malformed")


def test_validation_hook_rejects_invalid_plugins():
    def validate(spec, obj):
        if obj is not Thing:
            raise EnvError(f"`{spec.id}` is not a Thing")

    r = make_registry(validate)
    r.register("other-v0", dict)
    with pytest.raises(EnvError, match="is not a Thing"):
        r.make("other")


def test_duplicate_registration_is_an_error_unless_overridden():
    r = make_registry()
    r.register("a-v0", Thing)
    with pytest.raises(Exception, match="already registered"):
        r.register("a-v0", Thing)
    r.register("a-v0", dict, override=True)
    assert r.spec("a").entry_point is dict


def test_describe_uses_docstring_first_line():
    r = make_registry()
    spec = r.register("t-v0", Thing)
    assert describe(spec) == "A thing for tests."


def test_unknown_sandbox_backend_error():
    from spo_agents.registry import SANDBOXES

    with pytest.raises(SandboxNotFound, match="spo-agent sandbox list"):
        SANDBOXES.spec("no-such-backend")


def test_made_envs_carry_their_registered_id():
    from spo_agents import envs

    env = envs.make("countdown-python")
    try:
        assert env.env_id == "countdown-python-v0"
    finally:
        env.close()


def test_the_env_registry_rejects_a_class_that_is_not_an_env_on_every_path():
    from spo_agents.errors import EnvError
    from spo_agents.registry import ENVS

    ENVS.register("not-an-env-v0", f"{__name__}:Thing", override=True)
    try:
        with pytest.raises(EnvError, match="must be a subclass of `gymnasium.Env`"):
            ENVS.make("not-an-env")
    finally:
        ENVS._specs.pop("not-an-env-v0")
