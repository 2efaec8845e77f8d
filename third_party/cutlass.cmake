# CUTLASS (C++ headers only) for r1x's sm_90a kernels.
#
#   r1x_find_cutlass(<out_var>)  sets <out_var> to a CUTLASS source root (the folder holding
#                                include/cutlass and tools/util/include), found, in this order:
#   1. -DR1X_CUTLASS_DIR=<root> (CMake cache, e.g. -Ccmake.define.R1X_CUTLASS_DIR=... with pip)
#   2. the environment variable R1X_CUTLASS_DIR=<root> (a git checkout of NVIDIA/cutlass works)
#   3. the nvidia-cutlass wheel installed for the Python that builds r1x
#      (`pip install nvidia-cutlass`: its headers are under cutlass_library/source)
# and checks its version (include/cutlass/version.h) against R1X_CUTLASS_MIN_VERSION.

set(R1X_CUTLASS_MIN_VERSION 4.2)

function(r1x_find_cutlass out_var)
  set(how "")
  if(R1X_CUTLASS_DIR)
    set(root "${R1X_CUTLASS_DIR}")
    set(how "R1X_CUTLASS_DIR")
  elseif(DEFINED ENV{R1X_CUTLASS_DIR})
    set(root "$ENV{R1X_CUTLASS_DIR}")
    set(how "the environment variable R1X_CUTLASS_DIR")
  else()
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
              "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source'))"
      OUTPUT_VARIABLE root OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc ERROR_QUIET)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR
        "r1x: CUTLASS headers not found for the CUDA kernels: `pip install nvidia-cutlass>=${R1X_CUTLASS_MIN_VERSION}`, "
        "or set R1X_CUTLASS_DIR to a CUTLASS checkout (the folder holding include/cutlass), "
        "or build CPU-only with R1X_CUDA=OFF.")
    endif()
    set(how "the nvidia-cutlass wheel")
  endif()
  set(version_h "${root}/include/cutlass/version.h")
  if(NOT EXISTS "${root}/include/cutlass/cutlass.h" OR NOT EXISTS "${version_h}")
    message(FATAL_ERROR
      "r1x: ${root} (from ${how}) is not a CUTLASS source root: it holds no include/cutlass/cutlass.h; "
      "point R1X_CUTLASS_DIR at the folder that holds include/cutlass.")
  endif()
  file(STRINGS "${version_h}" lines REGEX "^#define CUTLASS_(MAJOR|MINOR|PATCH) [0-9]+")
  set(major 0)
  set(minor 0)
  set(patch 0)
  foreach(line IN LISTS lines)
    if(line MATCHES "^#define CUTLASS_MAJOR ([0-9]+)")
      set(major "${CMAKE_MATCH_1}")
    elseif(line MATCHES "^#define CUTLASS_MINOR ([0-9]+)")
      set(minor "${CMAKE_MATCH_1}")
    elseif(line MATCHES "^#define CUTLASS_PATCH ([0-9]+)")
      set(patch "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  set(version "${major}.${minor}.${patch}")
  if(version VERSION_LESS R1X_CUTLASS_MIN_VERSION)
    message(FATAL_ERROR
      "r1x: CUTLASS ${version} at ${root} (from ${how}) is too old: the sm_90a kernels need "
      ">= ${R1X_CUTLASS_MIN_VERSION} (`pip install -U nvidia-cutlass`, or a newer checkout in R1X_CUTLASS_DIR).")
  endif()
  message(STATUS "r1x: CUTLASS ${version} from ${how}: ${root}")
  set(${out_var} "${root}" PARENT_SCOPE)
  set(R1X_CUTLASS_VERSION "${version}" PARENT_SCOPE)
endfunction()
