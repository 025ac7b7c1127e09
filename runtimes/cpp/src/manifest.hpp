// manifest.json: the contract between `evoexport build` and every runtime (docs/manifest.md).
// This reader knows nothing of the model: only the graphs in execution order, the tensor names
// that wire them, their shapes and dtypes, and a sha256 of every file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace evoexport {

// One line for the user, printed as "error: <what>"; anything else that escapes is a bug.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

constexpr int kSchemaVersion = 2;   // the manifest version this runtime reads

struct TensorSpec {
    std::string name;
    std::string dtype;            // "float32", "int64", ...
    std::vector<int64_t> shape;   // -1 where the manifest says "batch" (the only dynamic axis)
};

struct Graph {
    std::string name;             // stage_0, select_0, stage_1, ...
    std::string kind;             // "encoder" or "select"
    std::string file;             // ONNX file inside the build directory
    std::vector<TensorSpec> inputs, outputs;
};

struct Manifest {
    std::filesystem::path dir;
    std::string model, precision;
    int64_t num_patches = 0;
    std::vector<TensorSpec> inputs;    // [pixel_values]
    std::vector<TensorSpec> outputs;   // features, then indices_i, merge_i, picks_i per prune point
    std::vector<Graph> graphs;         // execution order
    size_t prune_points = 0;
    bool temporal = false;             // a temporal build: its assemble graph outputs the indices
};

// Reads BUILD_DIR/manifest.json, or one grid's manifest BUILD/ROWSxCOLS.json of a bucketed
// build, and refuses (throws Error) an unknown schema version, a bucketed build's index, a
// graph file that is missing or not a plain name inside the build, or one whose sha256 differs.
Manifest read_manifest(const std::filesystem::path& build_dir);

// A bucketed build's grid for pixel values of height x width: the grid manifest whose size
// that is (its sha256 checked against the index); any other build is itself.
std::filesystem::path grid_for_input(const std::filesystem::path& build, int64_t height, int64_t width);

std::string sha256_file(const std::filesystem::path& path);

}  // namespace evoexport
