import pytest

from gateway.cluster.rbac import Role, RoleError, allowed_params, decide, refusal, session_ttl_cap, visible


def role(name, **spec):
    return Role.from_spec(name, spec)


DEV = role("dev", allow=[{"resources": ["echo*", "web"]}, {"labels": {"env": ["dev", "staging"]}}],
           max_session_ttl="2h")
NO_PROD = role("no-prod", deny=[{"labels": {"env": "prod"}}])
DB = role("db", allow=[{"resources": ["pg"], "db_users": ["app", "ro-*"], "db_names": "*"}],
          deny=[{"resources": ["pg"], "db_users": ["postgres"]}])


def test_allow_by_name_and_by_label():
    assert decide([DEV], "echo-1", {}).allowed
    assert decide([DEV], "other", {"env": "staging"}).allowed
    d = decide([DEV], "other", {"env": "prod"})
    assert not d.allowed and "dev" in d.reason


def test_deny_wins_across_roles():
    d = decide([DEV, NO_PROD], "echo-1", {"env": "prod"})
    assert not d.allowed and "no-prod" in d.reason
    assert decide([DEV, NO_PROD], "echo-1", {"env": "dev"}).allowed


def test_no_roles():
    assert decide([], "x", {}).reason == "the user has no roles"


def test_labels_require_key():
    r = role("r", allow=[{"labels": {"team": "*"}}])
    assert not decide([r], "x", {}).allowed
    assert decide([r], "x", {"team": "a"}).allowed


def test_rule_with_name_and_labels_needs_both():
    r = role("r", allow=[{"resources": "a*", "labels": {"env": "dev"}}])
    assert decide([r], "ab", {"env": "dev"}).allowed
    assert not decide([r], "ab", {"env": "prod"}).allowed
    assert not decide([r], "b", {"env": "dev"}).allowed


def test_params():
    assert decide([DB], "pg", {}, {"db_user": "app", "db_name": "x"}).allowed
    assert decide([DB], "pg", {}, {"db_user": "ro-1"}).allowed
    assert not decide([DB], "pg", {}, {"db_user": "other"}).allowed
    d = decide([DB], "pg", {}, {"db_user": "postgres"})
    assert not d.allowed and "deny" in d.reason
    # A rule without db_users does not allow a dial that names a db user.
    assert not decide([DEV], "echo", {}, {"db_user": "x"}).allowed
    assert allowed_params([DB], "pg", {}) == {"db_user": ["app", "ro-*"], "db_name": ["*"]}


def test_visible():
    assert visible([DEV], "echo", {})
    assert not visible([DEV, NO_PROD], "echo", {"env": "prod"})
    assert visible([DB], "pg", {})  # the param-only deny does not hide it
    assert not visible([DB], "x", {})


def test_ttl_cap():
    assert session_ttl_cap([DEV, NO_PROD]) == 7200
    assert session_ttl_cap([NO_PROD]) is None


def test_spec_roundtrip():
    for r in (DEV, NO_PROD, DB):
        assert Role.from_spec(r.name, r.to_spec()) == r


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"allow": [{}]}, "needs `resources` or `labels`"),
        ({"allow": [{"resource": "x"}]}, "unknown key"),
        ({"allow": [{"resources": [1]}]}, "list of non-empty strings"),
        ({"allow": "x"}, "list of rule tables"),
        ({"allow": [{"labels": ["a"]}]}, "labels must be a table"),
        ({"max_session_ttl": "soon"}, "not a duration"),
        ({"max_session_ttl": 0}, "positive"),
        ({"grant": []}, "unknown key"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(RoleError, match=match):
        Role.from_spec("r", spec)


def test_reasons_and_refusals_show_only_the_parameters_roles_constrain():
    params = {"db_user": "other", "db_name": "x", "pg.application_name": "psql"}
    assert decide([DB], "pg", {}, params).reason == "no role allows db_name=x, db_user=other on this resource"
    assert refusal([DB], "pg", {}, params) == \
        "access to 'pg' denied: none of your roles allows db_name=x, db_user=other on it"
    # Out of reach reads as unknown.
    assert refusal([DB], "other", {}) == refusal([DB], "other", None)
