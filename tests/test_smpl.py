"""SMPL loading (released chumpy pickles, cleaned pickles, npz) against independent readers."""

import copyreg
import pickle
import pickletools
import sys
import types

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.spatial.transform import Rotation

from jregfix.body.base import batch_vertices
from jregfix.body.smpl import SMPLBody
from jregfix.errors import JregfixError
from jregfix.io.smpl_file import load_smpl_file
from jregfix.io.smpl_write import (
    py2_dict_order,
    write_cleaned_pickle,
    write_npz,
    write_released_style_pickle,
)
from jregfix.synthetic.body import SMPL_PARENTS


def numpy_lbs(model: dict, rotmats: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """Textbook SMPL: shape + pose blend shapes, joints from the shaped mesh, LBS (one frame)."""
    v_shaped = model["v_template"] + np.asarray(model["shapedirs"])[:, :, :10] @ betas
    jreg = model["J_regressor"]
    jreg = jreg.toarray() if scipy.sparse.issparse(jreg) else np.asarray(jreg)
    joints = jreg @ v_shaped
    pose_feature = (rotmats[1:] - np.eye(3)).reshape(-1)
    v_posed = v_shaped + np.asarray(model["posedirs"]) @ pose_feature
    world = [None] * 24
    for j in range(24):
        local = np.eye(4)
        local[:3, :3] = rotmats[j]
        parent = SMPL_PARENTS[j]
        local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0)
        world[j] = local if parent < 0 else world[parent] @ local
    skin = np.stack(world)
    skin[:, :3, 3] -= np.einsum("jab,jb->ja", skin[:, :3, :3], joints)  # relative to rest joints
    t = np.einsum("vj,jab->vab", np.asarray(model["weights"]), skin)
    homo = np.concatenate([v_posed, np.ones((len(v_posed), 1))], 1)
    return np.einsum("vab,vb->va", t, homo)[:, :3]


def test_synthetic_model_has_smpl_format(smpl_like_model):
    m = smpl_like_model
    assert m["v_template"].shape == (6890, 3)
    assert m["f"].shape == (13776, 3)
    assert m["shapedirs"].shape == (6890, 3, 10)
    assert m["posedirs"].shape == (6890, 3, 207)
    assert scipy.sparse.issparse(m["J_regressor"]) and m["J_regressor"].shape == (24, 6890)
    # closed genus-0 surface: every edge shared by exactly two faces, Euler characteristic 2
    f = m["f"].astype(np.int64)
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()
    assert 6890 - len(counts) + len(f) == 2
    np.testing.assert_allclose(m["weights"].sum(1), 1.0)
    np.testing.assert_allclose(np.asarray(m["J_regressor"].sum(1)).ravel(), 1.0)


RELEASED_GLOBALS = {
    "__builtin__ set",
    "chumpy.ch Ch",
    "numpy dtype",
    "numpy ndarray",
    "numpy.core.multiarray _reconstruct",
    "scipy.sparse.csc csc_matrix",
}
# File order of basicModel_m_lbs_10_207_0_v1.0.0.pkl as printed by users who loaded it.
RELEASED_ORDER = [
    "J_regressor_prior",
    "f",
    "J_regressor",
    "kintree_table",
    "J",
    "weights_prior",
    "weights",
    "vert_sym_idxs",
    "posedirs",
    "pose_training_info",
    "bs_style",
    "v_template",
    "shapedirs",
    "bs_type",
]


class _RecordedObject:
    """What a pickled chumpy / scipy object carried, for the reference reader below."""

    def __setstate__(self, state):
        self.state = state


class _ReferenceUnpickler(pickle.Unpickler):
    """numpy's own array reconstruction plus recorders: an independent reading of our fixtures."""

    classes = {
        "chumpy.ch Ch": type("Ch", (_RecordedObject,), {}),
        "scipy.sparse.csc csc_matrix": type("csc", (_RecordedObject,), {}),
    }

    def find_class(self, module, name):
        known = {
            "numpy.core.multiarray _reconstruct": np.zeros(0).__reduce__()[0],
            "numpy ndarray": np.ndarray,
            "numpy dtype": np.dtype,
            "__builtin__ set": set,
            "__builtin__ object": object,
            "copy_reg _reconstructor": copyreg._reconstructor,
            **self.classes,
        }
        return known[f"{module} {name}"]


def _reference_load(path):
    with open(path, "rb") as f:
        return _ReferenceUnpickler(f, encoding="latin1").load()


def _small_model(model: dict, nv: int = 40) -> dict:
    """A few-vertex model with the released keys: enough for exact round trips of every value."""
    small = {
        k: (v[:nv] if k in ("v_template", "shapedirs", "posedirs", "weights") else v)
        for k, v in model.items()
    }
    small["J_regressor"] = scipy.sparse.random(24, nv, density=0.2, format="csc", random_state=0)
    small["f"] = np.array([[0, 1, 2], [2, 3, 4]], np.uint32)
    small["posedirs"] = np.asfortranarray(small["posedirs"])  # numpy's is_fortran path
    small["vert_sym_idxs"] = np.arange(nv)[::-1].copy()
    return small


def _assert_same_model(loaded: dict, model: dict):
    for key, value in model.items():
        if scipy.sparse.issparse(value):
            assert loaded[key].format == "csc" and (loaded[key] != value).nnz == 0, key
        elif isinstance(value, np.ndarray):
            assert loaded[key].dtype == value.dtype, key
            np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        else:
            assert loaded[key] == value, key


def test_default_fixture_has_the_released_chumpy_layout(smpl_pkl, smpl_like_model):
    data = smpl_pkl.read_bytes()
    ops = list(pickletools.genops(data))
    names = [op.name for op, _, _ in ops]
    assert names[:3] == ["PROTO", "EMPTY_DICT", "BINPUT"] and ops[2][1] == 1  # cPickle memo
    assert {arg for op, arg, _ in ops if op.name == "GLOBAL"} == RELEASED_GLOBALS
    # Python 2 strings only: no unicode, no bytes, no _codecs.encode
    assert not {"BINUNICODE", "SHORT_BINBYTES", "BINBYTES"} & set(names)
    ch = next(i for i, (op, arg, _) in enumerate(ops) if arg == "chumpy.ch Ch")
    assert names[ch + 1 : ch + 4] == ["BINPUT", "EMPTY_TUPLE", "NEWOBJ"]
    sets = [i for i, (op, arg, _) in enumerate(ops) if arg == "__builtin__ set"]
    after = [[n for n in names[i + 1 : i + 8] if n != "BINPUT"][:3] for i in sets]
    assert after == [["EMPTY_LIST", "TUPLE1", "REDUCE"]]  # set([]), one Ch in the file

    raw = _reference_load(smpl_pkl)
    assert list(raw) == RELEASED_ORDER
    shapedirs = raw["shapedirs"]
    assert type(shapedirs).__name__ == "Ch"
    assert list(shapedirs.state) == ["x", "_dirty_vars", "_itr", "_depends_on_deps"]
    assert shapedirs.state["_dirty_vars"] == set() and shapedirs.state["_itr"] is None
    assert shapedirs.state["_depends_on_deps"] == {}
    np.testing.assert_array_equal(shapedirs.state["x"], smpl_like_model["shapedirs"])
    jreg = raw["J_regressor"].state
    assert set(jreg) == {"format", "_shape", "maxprint", "data", "indices", "indptr"}
    assert jreg["_shape"] == (24, 6890) and jreg["format"] == "csc"
    assert isinstance(raw["posedirs"], np.ndarray) and raw["bs_type"] == "lrotmin"
    assert raw["pose_training_info"]["gender"] == "neutral"


def test_python2_dict_order():
    # what Python 2.7 printed for these literals, and the orders seen in dumps of real files
    assert py2_dict_order(["a", "b", "c"]) == ["a", "c", "b"]
    assert py2_dict_order(["one", "two", "three"]) == ["three", "two", "one"]
    assert py2_dict_order(["x", "y", "z"]) == ["y", "x", "z"]
    assert py2_dict_order(RELEASED_ORDER) == RELEASED_ORDER
    info = ["expid", "J_regressor_prior_wt", "restpose_type", "bs_style", "gender", "bs_type"]
    assert py2_dict_order(info) == info


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_every_protocol_round_trips_exactly(smpl_like_model, tmp_path, protocol):
    model = _small_model(smpl_like_model)
    path = tmp_path / "basicModel_f_lbs_10_207_0_v1.0.0.pkl"
    write_released_style_pickle(
        path,
        model,
        gender="female",
        protocol=protocol,
        chumpy_keys=("shapedirs", "v_template", "posedirs", "weights"),
    )
    data = path.read_bytes()
    if protocol < 2:  # objects through copy_reg._reconstructor(cls, object, None)
        assert b"ccopy_reg\n_reconstructor\n" in data and b"c__builtin__\nobject\n" in data
        assert b"cchumpy.ch\nCh\n" in data and b"\x81" not in data[:64]
    loaded = load_smpl_file(path)
    _assert_same_model(loaded, model)
    assert loaded["pose_training_info"]["gender"] == "female"
    assert list(loaded)[: len(RELEASED_ORDER)] == RELEASED_ORDER
    # and numpy's own reconstruction agrees with ours
    reference = _reference_load(path)
    np.testing.assert_array_equal(reference["f"], loaded["f"])
    np.testing.assert_array_equal(reference["posedirs"].state["x"], loaded["posedirs"])


def test_cleaned_pickle_has_no_chumpy(smpl_like_model, tmp_path):
    model = _small_model(smpl_like_model)
    path = tmp_path / "SMPL_MALE.pkl"
    write_cleaned_pickle(path, model, gender="male")
    data = path.read_bytes()
    assert data.startswith(b"(dp0\n") and b"chumpy" not in data  # pickle.py, protocol 0
    _assert_same_model(load_smpl_file(path), model)


def test_python3_resave_with_bytes_keys(smpl_like_model, tmp_path, rng):
    """A file loaded with encoding='bytes' and dumped again by Python 3 (numpy 2, scipy 1.x)."""
    model = {k.encode(): v for k, v in smpl_like_model.items()}
    path = tmp_path / "resaved.pkl"
    path.write_bytes(pickle.dumps(model, protocol=4))
    body = SMPLBody(path, dtype=torch.float64)
    aa, betas = rng.normal(size=(1, 72)) * 0.3, rng.normal(size=(1, 10))
    rot = Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix()
    verts = batch_vertices(body, torch.from_numpy(aa), torch.from_numpy(betas)).numpy()
    np.testing.assert_allclose(verts[0], numpy_lbs(smpl_like_model, rot, betas[0]), atol=1e-6)


@pytest.mark.parametrize("gender,protocol", [("female", 1), ("male", 0)])
def test_gendered_files_at_old_protocols_pose_like_numpy(
    smpl_like_model, tmp_path, rng, gender, protocol
):
    path = tmp_path / f"basicmodel_{gender[0]}_lbs_10_207_0_v1.1.0.pkl"
    write_released_style_pickle(path, smpl_like_model, gender=gender, protocol=protocol)
    body = SMPLBody(path, dtype=torch.float64)
    aa, betas = rng.normal(size=(2, 72)) * 0.4, rng.normal(size=(2, 10))
    rot = Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(2, 24, 3, 3)
    verts = batch_vertices(body, torch.from_numpy(aa), torch.from_numpy(betas)).numpy()
    for i in range(2):
        np.testing.assert_allclose(
            verts[i], numpy_lbs(smpl_like_model, rot[i], betas[i]), atol=1e-6
        )


def test_loader_matches_numpy_lbs(smpl_like_model, smpl_body, rng):
    aa = rng.normal(size=(3, 24, 3)) * 0.4
    betas = rng.normal(size=(3, 10))
    rot = Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(3, 24, 3, 3)
    ours = batch_vertices(
        smpl_body, torch.from_numpy(aa.reshape(3, 72)), torch.from_numpy(betas)
    ).numpy()
    for i in range(3):
        ref = numpy_lbs(smpl_like_model, rot[i], betas[i])
        np.testing.assert_allclose(ours[i], ref, atol=2e-5)


def test_npz_format_and_double_precision(smpl_like_model, tmp_path, rng):
    path = tmp_path / "SMPL_NEUTRAL.npz"
    write_npz(path, smpl_like_model)
    body = SMPLBody(path, dtype=torch.float64)
    aa = rng.normal(size=(2, 72)) * 0.3
    betas = rng.normal(size=(2, 10))
    verts = batch_vertices(body, torch.from_numpy(aa), torch.from_numpy(betas)).numpy()
    rot = Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(2, 24, 3, 3)
    # smplx stores its buffers through float32 (smplx.utils.to_np), hence not 1e-12
    np.testing.assert_allclose(verts[1], numpy_lbs(smpl_like_model, rot[1], betas[1]), atol=1e-6)


def test_chunking_does_not_change_results(smpl_body, rng):
    pose = torch.from_numpy(rng.normal(size=(7, 24, 6)))
    betas = torch.from_numpy(rng.normal(size=(7, 10)))
    a = batch_vertices(smpl_body, pose, betas, chunk_size=3)
    b = batch_vertices(smpl_body, pose, betas, chunk_size=100)
    torch.testing.assert_close(a, b)


def test_missing_key_and_bad_shape(smpl_like_model, tmp_path):
    partial = {k: v for k, v in smpl_like_model.items() if k != "posedirs"}
    path = tmp_path / "partial.npz"
    write_npz(path, partial)
    with pytest.raises(JregfixError, match="posedirs"):
        load_smpl_file(path)
    bad = dict(smpl_like_model, weights=np.ones((100, 24)))
    write_npz(path, bad)
    with pytest.raises(JregfixError, match="weights"):
        load_smpl_file(path)


def _fake_chumpy(state, module="chumpy.ch", name="Ch"):
    """An object that pickles as ``{module}.{name}`` (a chumpy class) with ``state``, by NEWOBJ."""
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):  # the import machinery wants the parent packages
        sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(parts[depth - 1]))
    cls = getattr(sys.modules[module], name, None)
    if cls is None:
        cls = type(
            name,
            (),
            {
                "__module__": module,
                "__qualname__": name,
                "__reduce_ex__": lambda self, protocol: (
                    copyreg.__newobj__,
                    (type(self),),
                    self.pickled_state,
                ),
            },
        )
        setattr(sys.modules[module], name, cls)
    obj = cls()
    obj.pickled_state = state
    return obj


def _ch_state(x, **changes):
    return {"x": x, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {}, **changes}


@pytest.fixture
def fake_chumpy_modules():
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def _dump_model(path, model: dict, **overrides):
    path.write_bytes(pickle.dumps({**model, **overrides}, protocol=2))
    return path


@pytest.mark.parametrize(
    "protocol,set_global", [(2, "__builtin__ set"), (3, "builtins set"), (4, None), (5, None)]
)
def test_python3_chumpy_resaves_are_accepted(
    smpl_like_model, tmp_path, fake_chumpy_modules, protocol, set_global
):
    """Files dumped again by Python 3 with chumpy installed (numpy 2 arrays, str keys; at
    protocol 5 numpy reduces arrays to _frombuffer)."""
    model = _small_model(smpl_like_model)
    # chumpy >= 0.67 also stores _make_dense/_make_sparse; .r never evaluated leaves {'x'} dirty
    state = _ch_state(model["shapedirs"], _dirty_vars={"x"}, _make_dense=False, _make_sparse=False)
    info = {"J_regressor_prior_wt": np.float64(10.0), "gender": "male"}
    path = tmp_path / "m.pkl"
    path.write_bytes(
        pickle.dumps(
            {**model, "shapedirs": _fake_chumpy(state), "pose_training_info": info},
            protocol=protocol,
        )
    )
    names = {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}
    assert set_global is None or set_global in names
    assert (b"_frombuffer" in path.read_bytes()) == (protocol == 5)
    loaded = load_smpl_file(path)
    _assert_same_model(loaded, model)
    assert loaded["pose_training_info"] == info


@pytest.mark.parametrize(
    "value,expected",
    [
        ("deps", "non-empty _depends_on_deps"),
        ("extra", r"attribute\(s\) \['a'\]"),
        ("nested", "not a plain array"),
        ("dirty", "bookkeeping"),
        ("select", "chumpy.reordering.Select"),
        ("add", "chumpy.ch_ops.add"),
    ],
)
def test_computed_chumpy_objects_are_refused(
    smpl_like_model, tmp_path, fake_chumpy_modules, value, expected
):
    model = _small_model(smpl_like_model)
    x = model["shapedirs"]
    leaf = _fake_chumpy(_ch_state(x))
    node = {
        "deps": _fake_chumpy(
            _ch_state(
                x, _depends_on_deps={"r": {"deps": {"x"}, "value": None, "out_of_date": True}}
            )
        ),
        "extra": _fake_chumpy(_ch_state(x, a=leaf)),
        "nested": _fake_chumpy(_ch_state(leaf)),
        "dirty": _fake_chumpy(_ch_state(x, _dirty_vars={"a"})),
        "select": _fake_chumpy(
            {"a": leaf, "idxs": np.arange(3), "preferred_shape": (3,)},
            "chumpy.reordering",
            "Select",
        ),
        "add": _fake_chumpy({"a": leaf, "b": leaf}, "chumpy.ch_ops", "add"),
    }[value]
    path = _dump_model(tmp_path / "m.pkl", model, shapedirs=node)
    with pytest.raises(JregfixError, match=expected) as err:
        load_smpl_file(path)
    message = str(err.value)
    assert "'shapedirs'" in message and "computed" in message and "\n" not in message


def _hostile_pickles(sentinel) -> dict[str, tuple[bytes, str]]:
    """label -> (protocol-0 payload, what the refusal says)."""
    cmd = f"touch {sentinel}".encode()
    code = f"open({str(sentinel)!r}, 'w')".encode()
    return {
        "os.system": (b"cos\nsystem\n(S'" + cmd + b"'\ntR.", "'os.system' is not allowed"),
        "posix.system in a value": (
            b"(dp0\nS'v_template'\np1\ncposix\nsystem\n(S'" + cmd + b"'\ntRs.",
            "'posix.system' is not allowed",
        ),
        "eval": (b'c__builtin__\neval\n(S"' + code + b'"\ntR.', "'__builtin__.eval' is not"),
        "builtins.exec": (b'cbuiltins\nexec\n(S"' + code + b'"\ntR.', "'builtins.exec' is not"),
        "set of os.system": (
            b"c__builtin__\nset\n((cos\nsystem\n(S'" + cmd + b"'\ntRltR.",
            "'os.system' is not allowed",
        ),
        "set of non-names": (b"c__builtin__\nset\n((I1\nltR.", "set holds something other"),
        "reconstructor of object": (
            (b"ccopy_reg\n_reconstructor\n(c__builtin__\nobject\nc__builtin__\nobject\nNtR."),
            "_reconstructor of something",
        ),
        "reconstructor of os.system": (
            (b"ccopy_reg\n_reconstructor\n(cos\nsystem\nc__builtin__\nobject\nNtR."),
            "'os.system' is not",
        ),
        "Ch called with a command": (
            b"cchumpy.ch\nCh\n(S'" + cmd + b"'\ntR.",
            "constructed with arguments",
        ),
        "numpy.ndarray called": (b"cnumpy\nndarray\n((I10\ntS'f8'\ntR.", "called directly"),
        "codecs other than latin1": (
            b"c_codecs\nencode\n(S'" + cmd + b"'\nS'rot13'\ntR.",
            "other than latin-1",
        ),
        "subprocess": (
            b"csubprocess\ncheck_call\n((S'touch'\nS'" + str(sentinel).encode() + b"'\nltR.",
            "'subprocess.check_call' is not allowed",
        ),
        "numpy.load": (b"cnumpy\nload\n(S'x.npy'\ntR.", "'numpy.load' is not allowed"),
        "persistent id": (b"P" + cmd + b"\n.", "persistent ids"),
    }


def test_hostile_pickles_execute_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    for label, (payload, expected) in _hostile_pickles(sentinel).items():
        path = tmp_path / "evil.pkl"
        path.write_bytes(payload)
        with pytest.raises(JregfixError) as err:
            load_smpl_file(path)
        message = str(err.value)
        assert expected in message and str(path) in message and "\n" not in message, label
        assert not sentinel.exists(), label
    # the payloads are live: an unrestricted unpickler does run the first one
    pickle.loads(_hostile_pickles(sentinel)["os.system"][0])
    assert sentinel.exists()


class _ArrayClaim:
    """Pickles as numpy's own reduction of an ndarray, with a made-up shape and data."""

    def __init__(self, placeholder, shape, raw, dtype="f8"):
        self.args, self.state = placeholder, (1, shape, np.dtype(dtype), False, raw)

    def __reduce__(self):
        return np.zeros(0).__reduce__()[0], (np.ndarray, self.args, b"b"), self.state


class _FrombufferClaim:
    """Pickles as numpy's protocol-5 reduction (``_frombuffer``) with a made-up shape."""

    def __init__(self, shape, raw, order="C"):
        self.args = (raw, np.dtype("f8"), shape, order)

    def __reduce__(self):
        return np.asfortranarray(np.ones((2, 2))).__reduce_ex__(5)[0], self.args


@pytest.mark.parametrize(
    "claim,expected",
    [
        (_FrombufferClaim((10**12,), b"\0" * 8), "declares 8000000000000 bytes"),
        (_FrombufferClaim((2,), b"\0" * 16, order="K"), "bad array order"),
        (_ArrayClaim((10**12,), (0,), b""), "placeholder .* declares"),
        (_ArrayClaim((0,), (10**12,), b"\0" * 8), "declares 8000000000000 bytes"),
        (_ArrayClaim((0,), (10**6,), b"\0" * 8), "declares 8000000 bytes"),  # more than the file
        (_ArrayClaim((0,), (2,), b"\0" * 8), "does not hold 16 bytes"),
        (_ArrayClaim((0,), (2,), b"\0" * 16, dtype="O"), "not numeric"),
        (_ArrayClaim((0,), (2,), b"\0" * 16, dtype="U1"), "not numeric"),
    ],
)
def test_array_claims_are_checked_before_allocating(tmp_path, claim, expected):
    path = tmp_path / "claim.pkl"
    path.write_bytes(pickle.dumps({"v_template": claim}, protocol=2))
    with pytest.raises(JregfixError, match=expected):
        load_smpl_file(path)


@pytest.mark.parametrize(
    "key,bad", [("v_template", np.nan), ("shapedirs", np.inf), ("J_regressor", np.nan)]
)
def test_non_finite_values_are_refused(smpl_like_model, tmp_path, key, bad):
    model = _small_model(smpl_like_model)
    if key == "J_regressor":
        model[key] = model[key].copy()
        model[key].data[3] = bad
    else:
        model[key] = model[key].copy()
        model[key].flat[5] = bad
    path = tmp_path / "bad.pkl"
    write_released_style_pickle(path, model)
    with pytest.raises(JregfixError, match=f"'{key}' holds NaN or infinite"):
        load_smpl_file(path)


def test_non_numeric_npz_is_refused(smpl_like_model, tmp_path):
    model = dict(_small_model(smpl_like_model))
    model["weights"] = np.full(model["weights"].shape, "w")
    path = tmp_path / "bad.npz"
    write_npz(path, model)
    with pytest.raises(JregfixError, match="'weights' has non-numeric dtype"):
        load_smpl_file(path)
