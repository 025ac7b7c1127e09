#include "npy.hpp"

#include <zlib.h>

#include <cstring>
#include <fstream>
#include <limits>

#include "manifest.hpp"

namespace evoexport {

// The value that follows 'key': in the header's Python dict literal.
static std::string dict_value(const std::string& header, const std::string& key) {
    const auto at = header.find("'" + key + "'");
    if (at == std::string::npos) return {};
    auto start = header.find(':', at) + 1;
    while (start < header.size() && header[start] == ' ') ++start;
    if (header[start] == '(') return header.substr(start, header.find(')', start) - start + 1);
    if (header[start] == '\'') return header.substr(start + 1, header.find('\'', start + 1) - start - 1);
    return header.substr(start, header.find_first_of(",}", start) - start);
}

static size_t item_size(const std::string& descr) {
    if (descr.size() < 3 || (descr[0] != '<' && descr[0] != '|')) return 0;
    return static_cast<size_t>(std::stoul(descr.substr(2)));
}

Array read_npy(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error("cannot read " + path.string());
    char magic[8];
    if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
        throw Error(path.string() + " is not a .npy file");
    uint32_t header_len = 0;
    unsigned char len_bytes[4] = {0, 0, 0, 0};
    in.read(reinterpret_cast<char*>(len_bytes), magic[6] == 1 ? 2 : 4);
    for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
    std::string header(header_len, '\0');
    if (!in.read(header.data(), header_len)) throw Error(path.string() + " has a truncated .npy header");

    Array a;
    a.descr = dict_value(header, "descr");
    if (dict_value(header, "fortran_order") != "False")
        throw Error(path.string() + " is Fortran-ordered; save it C-ordered (numpy.ascontiguousarray)");
    const std::string shape = dict_value(header, "shape");   // "(1, 3, 32, 32)" or "(4,)"
    for (size_t i = 1; i < shape.size();) {
        const size_t end = shape.find_first_of(",)", i);
        const std::string dim = shape.substr(i, end - i);
        if (dim.find_first_not_of(' ') != std::string::npos) a.shape.push_back(std::stoll(dim));
        i = end + 1;
    }
    const size_t size = item_size(a.descr);
    if (size == 0) throw Error(path.string() + " has dtype '" + a.descr + "', which this runtime does not read");
    size_t count = 1;
    for (auto d : a.shape) count *= static_cast<size_t>(d);
    a.data.resize(count * size);
    if (!in.read(a.data.data(), static_cast<std::streamsize>(a.data.size())))
        throw Error(path.string() + " is truncated: expected " + std::to_string(a.data.size()) + " bytes of data");
    return a;
}

std::string npy_bytes(const Array& a) {
    std::string shape = "(";
    for (auto d : a.shape) shape += std::to_string(d) + ", ";
    if (a.shape.size() > 1) shape.resize(shape.size() - 2);   // (1, 2) but (4,)
    else if (a.shape.size() == 1) shape.resize(shape.size() - 1);
    shape += ")";
    std::string header = "{'descr': '" + a.descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
    const size_t unpadded = 10 + header.size() + 1;             // magic(6) version(2) len(2) ... '\n'
    header += std::string((64 - unpadded % 64) % 64, ' ') + "\n";  // data starts 64-byte aligned
    std::string out("\x93NUMPY\x01\x00", 8);
    out += static_cast<char>(header.size() & 0xff);
    out += static_cast<char>(header.size() >> 8);
    out += header;
    out.append(a.data.data(), a.data.size());
    return out;
}

static void put16(std::vector<char>& b, uint16_t v) { b.push_back(char(v & 0xff)); b.push_back(char(v >> 8)); }
static void put32(std::vector<char>& b, uint32_t v) { put16(b, uint16_t(v & 0xffff)); put16(b, uint16_t(v >> 16)); }

// A zip archive with stored (uncompressed) members, as numpy.savez writes. Written next to
// `path` and renamed into place, so a failure never leaves half an archive under that name.
void write_npz(const std::filesystem::path& path, const std::vector<std::pair<std::string, Array>>& arrays) {
    std::vector<char> zip, central;
    for (const auto& [name, array] : arrays) {
        const std::string member = npy_bytes(array);
        const std::string file = name + ".npy";
        if (member.size() >= std::numeric_limits<uint32_t>::max() || zip.size() >= std::numeric_limits<uint32_t>::max())
            throw Error("output " + name + " is over 4 GiB, more than a plain .npz holds; use a smaller --batch");
        const uint32_t crc = static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(member.data()),
                                                         static_cast<uInt>(member.size())));
        const auto offset = static_cast<uint32_t>(zip.size());
        const auto size = static_cast<uint32_t>(member.size());
        for (auto* b : {&zip, &central}) {
            const bool local = b == &zip;
            put32(*b, local ? 0x04034b50 : 0x02014b50);       // signature
            if (!local) put16(*b, 20);                         // made by
            put16(*b, 20); put16(*b, 0); put16(*b, 0);         // version needed, flags, method: stored
            put16(*b, 0); put16(*b, 0x21);                     // time, date (1980-01-01)
            put32(*b, crc); put32(*b, size); put32(*b, size);
            put16(*b, uint16_t(file.size())); put16(*b, 0);    // name length, extra length
            if (!local) { put16(*b, 0); put16(*b, 0); put16(*b, 0); put32(*b, 0); put32(*b, offset); }
            b->insert(b->end(), file.begin(), file.end());
        }
        zip.insert(zip.end(), member.begin(), member.end());
    }
    const auto central_offset = static_cast<uint32_t>(zip.size());
    zip.insert(zip.end(), central.begin(), central.end());
    put32(zip, 0x06054b50); put16(zip, 0); put16(zip, 0);              // end of central directory
    put16(zip, uint16_t(arrays.size())); put16(zip, uint16_t(arrays.size()));
    put32(zip, uint32_t(central.size())); put32(zip, central_offset); put16(zip, 0);

    const std::filesystem::path tmp = path.string() + ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        if (!out || !out.write(zip.data(), static_cast<std::streamsize>(zip.size())))
            throw Error("cannot write " + tmp.string());
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) throw Error("cannot write " + path.string() + ": " + ec.message());
}

}  // namespace evoexport
