// evoexport-run: run an evoexport build from its manifest alone, with the OpenVINO C++ API.
//
//   evoexport-run BUILD_DIR --input x.npy --output out.npz [--threads N] [--device CPU]
//
// The same chain as the Python runtime (evoexport/runtime.py): every graph in manifest order,
// each fed the tensors its manifest entry names, outputs added to one name -> tensor table.
// Encoder stages compile with OpenVINO's defaults (bf16 where the CPU has it), selection graphs
// with an fp32 inference precision: their outputs are decisions made by comparing scores,
// which bf16 rounding would flip. This matches the Python `openvino` backend exactly.
#include <openvino/openvino.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iostream>
#include <map>
#include <sstream>

#include "manifest.hpp"
#include "npy.hpp"

namespace fs = std::filesystem;
using namespace evoexport;

namespace {

const char* kUsage =
    "usage: evoexport-run BUILD_DIR --input PIXELS.npy --output OUT.npz [--threads N] [--device CPU] [--repeat N]\n"
    "  BUILD_DIR   a build, a bucketed build (the grid of the input's H x W runs), or one grid's GRID.json\n"
    "  PIXELS.npy  float32 [B, 3, H, W], preprocessed as the manifest's `preprocess` says\n"
    "  OUT.npz     features, indices, and indices_i / merge_i / picks_i per prune point\n"
    "  --repeat N  run the chain N times and print the median and p90 latency (default 1)\n";

struct Options {
    fs::path build_dir, input, output;
    std::string device = "CPU";
    int threads = 0;
    int repeat = 1;
};

int count(const std::string& flag, const std::string& v, int minimum) {
    if (v.empty() || v.size() > 6 || v.find_first_not_of("0123456789") != std::string::npos || std::stoi(v) < minimum)
        throw Error(flag + " takes a whole number >= " + std::to_string(minimum) + ", got '" + v + "'");
    return std::stoi(v);
}

Options parse_args(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw Error(arg + " needs a value");
            return argv[++i];
        };
        if (arg == "-h" || arg == "--help") { std::cout << kUsage; std::exit(0); }
        else if (arg == "--input") o.input = value();
        else if (arg == "--output") o.output = value();
        else if (arg == "--device") o.device = value();
        else if (arg == "--threads") o.threads = count(arg, value(), 0);
        else if (arg == "--repeat") o.repeat = count(arg, value(), 1);
        else if (!arg.empty() && arg[0] == '-') throw Error("unknown option " + arg);
        else if (o.build_dir.empty()) o.build_dir = arg;
        else throw Error("unexpected argument " + arg);
    }
    if (o.build_dir.empty() || o.input.empty() || o.output.empty())
        throw Error("BUILD_DIR, --input and --output are required (evoexport-run --help)");
    return o;
}

std::string shape_text(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + (shape[i] < 0 ? std::string("B") : std::to_string(shape[i]));
    return s + "]";
}

// The input must match the manifest's pixel_values: float32, every axis fixed but the batch.
void check_input(const Array& pixels, const TensorSpec& spec) {
    if (pixels.descr != "<f4") throw Error(spec.name + " must be float32, got numpy dtype '" + pixels.descr + "'");
    bool ok = pixels.shape.size() == spec.shape.size() && !pixels.shape.empty() && pixels.shape[0] >= 1;
    for (size_t i = 1; ok && i < spec.shape.size(); ++i) ok = pixels.shape[i] == spec.shape[i];
    if (!ok) throw Error(spec.name + " must have shape " + shape_text(spec.shape) + ", got " + shape_text(pixels.shape));
}

// An OpenVINO error as one line that says what went wrong: the lines naming its source files
// ("Exception from src/...:132:", "Check '...' failed at src/...:563:") are dropped.
std::string cause(const std::string& what) {
    std::string out, line;
    std::istringstream lines(what);
    while (std::getline(lines, line)) {
        const bool where = line.rfind("Exception from ", 0) == 0 || line.rfind("FrontEnd API failed with", 0) == 0 ||
                           (line.rfind("Check '", 0) == 0 && line.find("' failed at ") != std::string::npos);
        if (!where && line.find_first_not_of(" \t") != std::string::npos) out += (out.empty() ? "" : " ") + line;
    }
    return out.empty() ? what.substr(0, what.find('\n')) : out;
}

std::string dtype_name(const ov::element::Type& type) {
    static const std::map<ov::element::Type_t, std::string> names = {
        {ov::element::f32, "float32"}, {ov::element::f16, "float16"}, {ov::element::bf16, "bfloat16"},
        {ov::element::i64, "int64"}, {ov::element::i32, "int32"}, {ov::element::u8, "uint8"},
        {ov::element::i8, "int8"}, {ov::element::boolean, "bool"}};
    const auto it = names.find(type);
    return it == names.end() ? type.get_type_name() : it->second;
}

// The manifest is input: every tensor it names must be the compiled graph's own, with the same
// element type, rank and fixed sizes, and the graph may take no input the manifest does not name.
void check_graph_io(const Graph& g, const ov::CompiledModel& compiled) {
    const std::string where = g.file + " (" + g.name + ")";
    auto check = [&](const std::vector<TensorSpec>& specs, const std::vector<ov::Output<const ov::Node>>& ports,
                     const std::string& kind) {
        for (const TensorSpec& spec : specs) {
            const ov::Output<const ov::Node>* port = nullptr;
            for (const auto& p : ports)
                if (p.get_names().count(spec.name)) port = &p;
            if (port == nullptr)
                throw Error(where + " has no " + kind + " '" + spec.name + "', which the manifest names; the graph "
                            "and the manifest do not belong together, rebuild");
            const ov::PartialShape& shape = port->get_partial_shape();
            bool same = dtype_name(port->get_element_type()) == spec.dtype && shape.rank().is_static() &&
                        shape.rank().get_length() == static_cast<int64_t>(spec.shape.size());
            for (size_t i = 0; same && i < spec.shape.size(); ++i)
                if (spec.shape[i] >= 0 && shape[i].is_static()) same = shape[i].get_length() == spec.shape[i];
            if (!same)
                throw Error(where + ": " + kind + " '" + spec.name + "' is " + dtype_name(port->get_element_type()) +
                            " " + shape.to_string() + " in the graph, " + spec.dtype + " " + shape_text(spec.shape) +
                            " in the manifest; rebuild");
        }
    };
    check(g.inputs, compiled.inputs(), "input");
    check(g.outputs, compiled.outputs(), "output");
    for (const auto& port : compiled.inputs()) {
        bool named = false;
        for (const TensorSpec& spec : g.inputs) named = named || port.get_names().count(spec.name) > 0;
        if (!named) throw Error(where + " takes input " + port.get_any_name() + ", which the manifest does not name; "
                                "the graph and the manifest do not belong together, rebuild");
    }
}

std::string numpy_descr(const ov::element::Type& type) {
    static const std::map<ov::element::Type_t, std::string> descr = {
        {ov::element::f32, "<f4"}, {ov::element::f16, "<f2"}, {ov::element::i64, "<i8"},
        {ov::element::i32, "<i4"}, {ov::element::u8, "|u1"}, {ov::element::boolean, "|b1"}};
    const auto it = descr.find(type);
    if (it == descr.end()) throw Error("an output has element type " + type.get_type_name() + ", which cannot be written to .npy");
    return it->second;
}

Array to_array(const ov::Tensor& t) {
    Array a{numpy_descr(t.get_element_type()), {}, {}};
    for (auto d : t.get_shape()) a.shape.push_back(static_cast<int64_t>(d));
    const auto* bytes = static_cast<const char*>(t.data());
    a.data.assign(bytes, bytes + t.get_byte_size());
    return a;
}

// Final kept positions: the last prune point's indices, or every patch when nothing is pruned.
Array final_indices(const Manifest& m, const std::map<std::string, ov::Tensor>& env, int64_t batch) {
    if (m.prune_points) return to_array(env.at("indices_" + std::to_string(m.prune_points - 1)));
    Array a{"<i8", {batch, m.num_patches}, std::vector<char>(size_t(batch * m.num_patches) * sizeof(int64_t))};
    auto* out = reinterpret_cast<int64_t*>(a.data.data());
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t n = 0; n < m.num_patches; ++n) out[b * m.num_patches + n] = n;
    return a;
}

int run(const Options& o) {
    Array pixels = read_npy(o.input);
    const int64_t rank = static_cast<int64_t>(pixels.shape.size());
    // a bucketed build: the grid of the input's height x width
    const Manifest m = read_manifest(rank >= 2 ? grid_for_input(o.build_dir, pixels.shape[rank - 2], pixels.shape[rank - 1])
                                               : o.build_dir);
    check_input(pixels, m.inputs[0]);
    const int64_t batch = pixels.shape[0];

    ov::Core core;
    std::map<std::string, ov::InferRequest> requests;
    for (const Graph& g : m.graphs) {
        ov::AnyMap config{ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
        if (g.kind != "encoder") config.emplace(ov::hint::inference_precision(ov::element::f32));
        if (o.threads > 0) config.emplace(ov::inference_num_threads(o.threads));
        ov::CompiledModel compiled;
        try {
            compiled = core.compile_model((m.dir / g.file).string(), o.device, config);
        } catch (const ov::Exception& e) {
            throw Error("OpenVINO cannot compile " + g.file + ": " + cause(e.what()));
        }
        check_graph_io(g, compiled);
        requests[g.name] = compiled.create_infer_request();
    }

    std::map<std::string, ov::Tensor> env;
    ov::Shape input_shape(pixels.shape.begin(), pixels.shape.end());
    env[m.inputs[0].name] = ov::Tensor(ov::element::f32, input_shape, pixels.data.data());   // no copy
    std::vector<double> ms;
    for (int r = 0; r < o.repeat; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        for (const Graph& g : m.graphs) {   // each request runs once a pass, so its outputs stay valid
            ov::InferRequest& request = requests.at(g.name);
            for (const TensorSpec& in : g.inputs) {
                const auto found = env.find(in.name);
                if (found == env.end()) throw Error(g.name + " needs " + in.name + ", which no earlier graph produced");
                request.set_tensor(in.name, found->second);
            }
            request.infer();
            for (const TensorSpec& out : g.outputs) env[out.name] = request.get_tensor(out.name);
        }
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    const double median = ms[ms.size() / 2], p90 = ms[std::min(ms.size() - 1, size_t(0.9 * double(ms.size())))];

    std::vector<std::pair<std::string, Array>> outputs;
    for (const TensorSpec& spec : m.outputs) {
        if (!env.count(spec.name)) throw Error("the manifest lists output " + spec.name + ", which no graph produced");
        outputs.emplace_back(spec.name, to_array(env.at(spec.name)));
        if (spec.name == "features" && !m.temporal) outputs.emplace_back("indices", final_indices(m, env, batch));
    }
    write_npz(o.output, outputs);
    std::cerr << "evoexport-run: " << m.model << " (" << m.precision << "), " << m.graphs.size() << " graphs on "
              << o.device << ", batch " << batch << ": " << median << " ms"
              << (o.repeat > 1 ? " median, " + std::to_string(p90) + " ms p90 over " + std::to_string(o.repeat) + " runs" : "")
              << "; wrote " << o.output.string() << "\n";
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse_args(argc, argv));
    } catch (const Error& e) {
        std::cerr << "error: " << e.what() << "\n";
    } catch (const ov::Exception& e) {
        std::cerr << "error: OpenVINO: " << cause(e.what()) << "\n";
    } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << "\n";
    }
    return 1;
}
