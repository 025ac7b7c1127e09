#include "manifest.hpp"

#include <openssl/evp.h>

#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

namespace evoexport {
namespace fs = std::filesystem;
using nlohmann::json;

std::string sha256_file(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error("cannot read " + path.string());
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL cannot start a sha256");
    std::vector<char> chunk(1 << 22);
    while (in) {
        in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
        if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), chunk.data(), static_cast<size_t>(in.gcount()));
    }
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    EVP_DigestFinal_ex(ctx.get(), digest, &length);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < length; ++i) {
        out += hex[digest[i] >> 4];
        out += hex[digest[i] & 15];
    }
    return out;
}

static TensorSpec tensor_spec(const json& j) {
    TensorSpec t{j.at("name").get<std::string>(), j.at("dtype").get<std::string>(), {}};
    for (const auto& d : j.at("shape")) t.shape.push_back(d.is_string() ? -1 : d.get<int64_t>());
    return t;
}

static std::vector<TensorSpec> tensor_specs(const json& list) {
    std::vector<TensorSpec> out;
    for (const auto& j : list) out.push_back(tensor_spec(j));
    return out;
}

// A graph file named by the manifest: a plain name inside the build, present, and (for the
// file and its external weights) matching its sha256, so a truncated or edited build is refused.
// `hashed` keeps each file's sha256: a bucketed build's graphs share one weights.bin, hashed once.
static void check_file(const fs::path& dir, const json& entry, const char* file_key, const char* hash_key,
                       std::map<std::string, std::string>& hashed) {
    if (!entry.contains(file_key) || entry[file_key].is_null()) return;
    const auto name = entry[file_key].get<std::string>();
    if (fs::path(name).filename().string() != name || name == "." || name == "..")
        throw Error("graph file '" + name + "' must be a plain file name inside the build");
    const fs::path file = dir / name;
    if (!fs::is_regular_file(file)) throw Error(dir.string() + ": " + name + " named by the manifest is missing");
    if (!hashed.count(name)) hashed[name] = sha256_file(file);
    if (hashed[name] != entry.value(hash_key, std::string()))
        throw Error(dir.string() + ": " + name + " does not match its sha256 in the manifest (truncated or edited); rebuild it");
}

static Graph graph_entry(const fs::path& dir, const json& entry, std::map<std::string, std::string>& hashed) {
    check_file(dir, entry, "file", "sha256", hashed);
    check_file(dir, entry, "data_file", "data_sha256", hashed);
    return Graph{entry.at("name").get<std::string>(), entry.at("kind").get<std::string>(),
                 entry.at("file").get<std::string>(), tensor_specs(entry.at("inputs")),
                 tensor_specs(entry.at("outputs"))};
}

static json read_json(const fs::path& path) {
    try {
        std::ifstream in(path);
        return json::parse(in);
    } catch (const json::exception& e) {
        throw Error(path.string() + " is not valid JSON: " + e.what());
    }
}

fs::path grid_for_input(const fs::path& build, int64_t height, int64_t width) {
    const fs::path index = build / "manifest.json";
    if (!fs::is_directory(build) || !fs::is_regular_file(index)) return build;
    const json j = read_json(index);
    if (!j.is_object() || j.value("kind", std::string()) != "buckets") return build;
    std::string sizes;
    try {
        for (const auto& b : j.at("buckets")) {
            const auto size = b.at("image_size");
            const int64_t h = size.at(0).get<int64_t>(), w = size.at(1).get<int64_t>();
            sizes += (sizes.empty() ? "" : ", ") + std::to_string(h) + "x" + std::to_string(w);
            if (h != height || w != width) continue;
            const auto name = b.at("manifest").get<std::string>();
            if (fs::path(name).filename().string() != name || name == "." || name == "..")
                throw Error("grid manifest '" + name + "' must be a plain file name inside the build");
            if (sha256_file(build / name) != b.value("sha256", std::string()))
                throw Error(build.string() + ": " + name + " does not match its sha256 in the index (truncated or edited); rebuild it");
            return build / name;
        }
    } catch (const json::exception& e) {
        throw Error(index.string() + " is not an index of grids this runtime understands: " + e.what());
    }
    throw Error("the input is " + std::to_string(height) + "x" + std::to_string(width) + " pixels; " + build.string() +
                " is a bucketed build of " + sizes + " (pick the grid with evoexport's BucketRunner, or resize)");
}

Manifest read_manifest(const fs::path& build) {
    // a build directory, or one grid's manifest of a bucketed build (BUILD/13x18.json)
    const bool grid_file = fs::is_regular_file(build) && build.extension() == ".json";
    const fs::path build_dir = grid_file ? (build.has_parent_path() ? build.parent_path() : fs::path(".")) : build;
    if (!fs::is_directory(build_dir)) throw Error("build directory " + build_dir.string() + " does not exist");
    const fs::path path = grid_file ? build : build_dir / "manifest.json";
    if (!fs::is_regular_file(path)) throw Error(build_dir.string() + " is not an evoexport build: no manifest.json");
    const json j = read_json(path);
    if (!j.is_object()) throw Error(path.string() + " is not a JSON object");
    const json version = j.value("schema_version", json());
    if (!version.is_number_integer() || version.get<int>() != kSchemaVersion)
        throw Error(path.string() + " has schema_version " + version.dump() + "; this runtime reads version " +
                    std::to_string(kSchemaVersion));
    if (j.value("kind", std::string()) == "buckets")
        throw Error(build.string() + " is a bucketed build: give one grid's manifest (BUILD/ROWSxCOLS.json, "
                    "`evoexport info BUILD` lists them)");
    try {
        std::map<std::string, std::string> hashed;
        Manifest m;
        m.dir = build_dir;
        m.model = j.at("model").get<std::string>();
        m.precision = j.value("precision", std::string("fp32"));
        m.num_patches = j.at("tower").at("num_patches").get<int64_t>();
        m.inputs = tensor_specs(j.at("inputs"));
        m.outputs = tensor_specs(j.at("outputs"));
        m.prune_points = j.at("schedule").size();
        for (const auto& stage : j.at("stages")) {   // stage_i, then its selection graph (if any)
            m.graphs.push_back(graph_entry(build_dir, stage, hashed));
            if (stage.contains("select") && !stage["select"].is_null())
                m.graphs.push_back(graph_entry(build_dir, stage["select"], hashed));
        }
        // a temporal build: the later frames' graphs and the assemble graph, after the anchors'
        if (j.contains("temporal") && !j["temporal"].is_null()) {
            m.temporal = true;
            for (const auto& g : j["temporal"].at("graphs")) m.graphs.push_back(graph_entry(build_dir, g, hashed));
        }
        if (m.inputs.size() != 1) throw Error(path.string() + ": expected one input, found " + std::to_string(m.inputs.size()));
        return m;
    } catch (const json::exception& e) {
        throw Error(path.string() + " is not a manifest this runtime understands: " + e.what());
    }
}

}  // namespace evoexport
