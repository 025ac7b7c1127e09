// NumPy's .npy format (version 1.0/2.0/3.0 read, 1.0 written) and .npz archives (a zip of
// .npy members, stored uncompressed, as numpy.savez writes them).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace evoexport {

struct Array {
    std::string descr;              // numpy dtype string: "<f4", "<i8", "<i4", "<f2", ...
    std::vector<int64_t> shape;
    std::vector<char> data;         // C order, little-endian
};

// Reads a .npy file; throws Error for anything that is not a C-ordered array.
Array read_npy(const std::filesystem::path& path);

// The .npy bytes of an array (header + data).
std::string npy_bytes(const Array& array);

// Writes `arrays` (name, array) as an .npz archive; np.load(path)[name] reads each back.
void write_npz(const std::filesystem::path& path, const std::vector<std::pair<std::string, Array>>& arrays);

}  // namespace evoexport
