import XCTest
@testable import PEADiffusion

/// The safetensors reader, writer and sharded collections: round trips, the reference library's exact byte
/// layout, every malformed-file rule with an error naming the file and the tensor, atomic writes, and a
/// seeded fuzz run over random and mutated headers.
final class SafeTensorsTests: XCTestCase {

    // MARK: - Helpers

    /// A file image: 8-byte little-endian header length (the header's own unless `declaredLength` is
    /// given), the header text, then `data`.
    private func craft(_ header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
        let headerBytes = Array(header.utf8)
        return craft(headerBytes: headerBytes, data: data, declaredLength: declaredLength)
    }

    private func craft(headerBytes: [UInt8], data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
        let length = declaredLength ?? UInt64(headerBytes.count)
        var bytes = withUnsafeBytes(of: length.littleEndian) { Array($0) }
        bytes += headerBytes
        bytes += data
        return bytes
    }

    /// Writes a crafted file and asserts that opening it throws an error naming the file and each fragment.
    private func assertRejected(_ bytes: [UInt8], _ fragments: [String], file: StaticString = #filePath, line: UInt = #line) {
        let scratch = ScratchDirectory("pea-safetensors")
        let path = scratch.write(bytes, to: "bad.safetensors")
        assertThrowsError(containing: [path] + fragments, file: file, line: line) { try SafeTensorsFile(path: path) }
    }

    private func sampleTensors() -> [(name: String, tensor: HostTensor)] {
        [
            ("unet.conv_in.weight", HostTensor([1.5, -2, 3.25, 0, 1e-3, -7], shape: [2, 3])),
            ("half", HostTensor([0.5, -1.25, 1024, 6.1035156e-05], shape: [4], dtype: .f16)),
            ("brain", HostTensor([1, 2, -3], shape: [3, 1], dtype: .bf16)),
            ("ids32", HostTensor(ids: [1, -2, 3, 2_000_000_000, 5], shape: [5], dtype: .i32)),
            ("ids64", HostTensor(ids: [-1, 1 << 40], shape: [2], dtype: .i64)),
            ("scalar", HostTensor([42], shape: [])),
            ("empty", HostTensor([], shape: [0, 3], dtype: .f16)),
            ("empty32", HostTensor([], shape: [4, 0])),
        ]
    }

    // MARK: - Round trips

    func testRoundTripKeepsEveryDTypeShapeAndByte() throws {
        let scratch = ScratchDirectory("pea-safetensors")
        let path = scratch.file("model.safetensors")
        let tensors = sampleTensors()
        let metadata = ["format": "pt", "note": "ünïcode \"quoted\"\n\\ and / slashes"]
        try SafeTensorsWriter.write(tensors, metadata: metadata, to: path)
        XCTAssertEqual(scratch.entries(), ["model.safetensors"], "no temporary file left behind")

        let file = try SafeTensorsFile(path: path)
        XCTAssertEqual(file.metadata, metadata)
        XCTAssertEqual(file.names, tensors.map(\.name).sorted())
        XCTAssertEqual(file.headerByteCount % 8, 0, "header padded to 8 bytes")
        for (name, tensor) in tensors {
            XCTAssertTrue(file.contains(name))
            XCTAssertEqual(try file.tensor(name), tensor, name)
            XCTAssertEqual(try file.tensor(name, expecting: tensor.shape), tensor, name)
            let info = try file.info(name)
            XCTAssertEqual(info.name, name)
            XCTAssertEqual(info.dtype, tensor.dtype)
            XCTAssertEqual(info.shape, tensor.shape)
            XCTAssertEqual(info.byteCount, tensor.bytes.count)
            XCTAssertEqual(info.elementCount, tensor.count)
            XCTAssertEqual(info.fileOffset, file.dataSectionOffset + info.dataOffset)
            XCTAssertEqual(info.fileOffset % tensor.dtype.byteSize, 0, "\(name) aligned to its element size")
            XCTAssertEqual(try file.withBytes(name) { Array($0) }, tensor.bytes, name)
            XCTAssertEqual(try file.dtypeName(name), tensor.dtype.safetensorsName)
        }
        XCTAssertFalse(file.contains("missing"))
        XCTAssertEqual(try file.tensor("unet.conv_in.weight").floats(), [1.5, -2, 3.25, 0, 1e-3, -7])
        XCTAssertEqual(try file.tensor("ids64"), HostTensor(ids: [-1, 1 << 40], shape: [2], dtype: .i64))
        XCTAssertEqual(file.fileByteCount, readFileBytes(path)?.count)
    }

    func testWithBytesIsAViewIntoTheMapping() throws {
        let scratch = ScratchDirectory("pea-safetensors")
        let path = scratch.file("view.safetensors")
        try SafeTensorsWriter.write([("a", HostTensor([1, 2, 3, 4], shape: [4])), ("b", HostTensor([5], shape: [1]))], to: path)
        let file = try SafeTensorsFile(path: path)
        let a = try file.withBytes("a") { UInt(bitPattern: $0.baseAddress) }
        let b = try file.withBytes("b") { UInt(bitPattern: $0.baseAddress) }
        XCTAssertEqual(Int(bitPattern: b &- a), try file.info("b").dataOffset - file.info("a").dataOffset,
                       "both views point into the same mapping")
        let values = try file.withBytes("a") { raw in (0..<4).map { raw.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self) } }
        XCTAssertEqual(values, [1, 2, 3, 4])
        XCTAssertEqual(try file.withBytes("b") { $0.count }, 4)
    }

    /// Released pages leave the resident set and come back from the file when read again: a tensor spanning
    /// several pages reads the same before and after, and so do its neighbours on the shared pages.
    func testReleasedPagesReadBackTheSame() throws {
        let scratch = ScratchDirectory("pea-safetensors")
        let path = scratch.file("release.safetensors")
        let big = HostTensor((0..<5000).map { Float($0) * 0.5 }, shape: [5000])
        try SafeTensorsWriter.write([("a", HostTensor([1, 2, 3], shape: [3])), ("big", big), ("z", HostTensor([7], shape: [1]))], to: path)
        let file = try SafeTensorsFile(path: path)
        let before = try ["a", "big", "z"].map { try file.tensor($0).bytes }
        for name in ["big", "a", "z"] { try file.releasePages(name) }
        XCTAssertEqual(try ["a", "big", "z"].map { try file.tensor($0).bytes }, before)
        let weights = try SafeTensorsCollection(path: path)
        try weights.releasePages("big")
        XCTAssertEqual(try weights.tensor("big").bytes, before[1])
    }

    func testWriterMatchesTheReferenceLayoutByteForByte() throws {
        // The byte images of the reference implementation's own serialization tests (safetensors/src/tensor.rs).
        let scratch = ScratchDirectory("pea-safetensors")
        let values = HostTensor([0, 1, 2, 3, 4, 5], shape: [1, 2, 3])
        let single = scratch.file("single.safetensors")
        try SafeTensorsWriter.write([("attn.0", values)], to: single)
        XCTAssertEqual(readFileBytes(single), [
            64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100,
            116, 121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34,
            58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115,
            101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63,
            0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64,
        ])

        let padded = scratch.file("padded.safetensors")
        try SafeTensorsWriter.write([("attn0", HostTensor([0, 1, 2, 3, 4, 5], shape: [1, 1, 2, 3]))], to: padded)
        XCTAssertEqual(readFileBytes(padded), [
            72, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 48, 34, 58, 123, 34, 100, 116,
            121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58,
            91, 49, 44, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102,
            115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 32, 32, 32, 32, 32,
            32, 32, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0,
            160, 64,
        ])

        let empty = scratch.file("empty.safetensors")
        try SafeTensorsWriter.write([], to: empty)
        XCTAssertEqual(readFileBytes(empty), [8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32])

        let withMetadata = scratch.file("metadata.safetensors")
        try SafeTensorsWriter.write([], metadata: ["framework": "pt"], to: withMetadata)
        XCTAssertEqual(readFileBytes(withMetadata), [
            40, 0, 0, 0, 0, 0, 0, 0, 123, 34, 95, 95, 109, 101, 116, 97, 100, 97, 116, 97, 95,
            95, 34, 58, 123, 34, 102, 114, 97, 109, 101, 119, 111, 114, 107, 34, 58, 34, 112,
            116, 34, 125, 125, 32, 32, 32, 32, 32,
        ])
        XCTAssertEqual(try SafeTensorsFile(path: withMetadata).metadata, ["framework": "pt"])
    }

    func testWriterOrdersByAlignmentThenName() throws {
        let tensors: [(name: String, tensor: HostTensor)] = [
            ("z16", HostTensor([1], shape: [1], dtype: .f16)),
            ("a16", HostTensor([1, 2, 3], shape: [3], dtype: .f16)),
            ("b32", HostTensor([1], shape: [1])),
            ("bf", HostTensor([1], shape: [1], dtype: .bf16)),
            ("i64", HostTensor(ids: [1], shape: [1], dtype: .i64)),
            ("a32", HostTensor(ids: [1], shape: [1], dtype: .i32)),
        ]
        let (header, order) = try SafeTensorsWriter.layout(tensors, metadata: [:], path: "x")
        XCTAssertEqual(order.map { tensors[$0].name }, ["i64", "b32", "a32", "bf", "a16", "z16"])
        let text = String(decoding: header, as: UTF8.self)
        XCTAssertTrue(text.hasPrefix(#"{"i64":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},"b32":"#), text)
    }

    func testEmptyHeaderAndZeroElementTensorsAreValid() throws {
        let scratch = ScratchDirectory("pea-safetensors")
        let emptyPath = scratch.write(craft("{}"), to: "empty.safetensors")
        let empty = try SafeTensorsFile(path: emptyPath)
        XCTAssertEqual(empty.names, [])
        XCTAssertEqual(empty.metadata, [:])

        // Zero-length tensors may share an offset with each other and with the next tensor.
        let header = #"{"z1":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"w":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},"# +
            #""z2":{"dtype":"F16","shape":[3,0,2],"data_offsets":[4,4]},"z3":{"dtype":"F16","shape":[0],"data_offsets":[0,0]},"__metadata__":null}"#
        let path = scratch.write(craft(header, data: [7, 0, 0, 0]), to: "zeros.safetensors")
        let file = try SafeTensorsFile(path: path)
        XCTAssertEqual(file.names, ["w", "z1", "z2", "z3"])
        XCTAssertEqual(try file.tensor("z2"), HostTensor(shape: [3, 0, 2], dtype: .f16, bytes: []))
        XCTAssertEqual(try file.tensor("w"), HostTensor(ids: [7], shape: [1], dtype: .i32))
        XCTAssertEqual(try file.withBytes("z1") { $0.count }, 0)
    }

    func testHeaderMayHaveSurroundingWhitespaceAndUnusualNames() throws {
        let scratch = ScratchDirectory("pea-safetensors")
        let header = "  \n{ \"na\\u00efve \\\"w\\\"\" : {\"data_offsets\": [0, 2], \"shape\": [1], \"dtype\": \"BF16\", \"extra\": true} }\t  "
        let path = scratch.write(craft(header, data: [0x80, 0x3F]), to: "spaces.safetensors")
        let file = try SafeTensorsFile(path: path)
        XCTAssertEqual(file.names, ["naïve \"w\""])
        XCTAssertEqual(try file.tensor("naïve \"w\"").floats(), [1])
    }

    // MARK: - Malformed files

    func testRejectsBrokenFramingAndHeaders() {
        assertRejected([1, 2, 3, 4, 5], ["5 bytes", "too short"])
        assertRejected([], ["0 bytes", "too short"])
        assertRejected(craft("{}", declaredLength: 100), ["header length 100 runs past the end of the file (10 bytes)"])
        assertRejected(craft("{}", declaredLength: 100_000_001), ["header length 100000001 is larger than the limit"])
        assertRejected(craft("{}", declaredLength: UInt64.max), ["header length 18446744073709551615 is larger than the limit"])
        assertRejected(craft(headerBytes: Array(#"{"a\#u{0}":1}"#.utf8)), ["not valid JSON", "control character"])
        assertRejected(craft(headerBytes: [UInt8](#"{"w"#.utf8) + [0xFF, 0xFE] + [UInt8](#"":{}}"#.utf8)), ["not valid JSON", "invalid UTF-8", "offset 3"])
        assertRejected(craft("hello"), ["not valid JSON"])
        assertRejected(craft(#"{"a":{}"#), ["not valid JSON", "end of input"])
        assertRejected(craft("[1, 2]"), ["header is not a JSON object but an array of 2"])
        assertRejected(craft(#""text""#), ["not a JSON object"])
        assertRejected(craft(#"{"__metadata__":{"a":1}}"#), ["__metadata__ entry 'a' must be a string"])
        assertRejected(craft(#"{"__metadata__":[1]}"#), ["__metadata__ must be an object of strings"])
        // The header's length must cover the whole JSON text: a header cut short is invalid JSON.
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, data: [0, 0, 0, 0], declaredLength: 20), ["not valid JSON"])
    }

    func testRejectsMalformedEntriesNamingTheTensor() {
        let four: [UInt8] = [0, 0, 128, 63]
        assertRejected(craft(#"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w' has no dtype"])
        assertRejected(craft(#"{"w":{"dtype":"F32","data_offsets":[0,4]}}"#, data: four), ["tensor 'w' has no shape"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1]}}"#, data: four), ["tensor 'w' has no data_offsets"])
        assertRejected(craft(#"{"w":[1,2]}"#, data: four), ["tensor 'w': expected an object"])
        assertRejected(craft(#"{"w":{"dtype":32,"shape":[1],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w': dtype must be a string, found an integer 32"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":"1","data_offsets":[0,4]}}"#, data: four), ["tensor 'w': shape must be a list of integers"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w'", "not a non-negative integer (-1)"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w'", "not a non-negative integer (1.5)"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[null],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w'", "not a non-negative integer (null)"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1e300],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w'", "not a non-negative integer"])
        assertRejected(craft(#"{"w":{"dtype":"F17","shape":[1],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w' has unknown dtype 'F17'"])
        assertRejected(craft(#"{"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#, data: four), ["unknown dtype 'f32'"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, data: four), ["tensor 'w': data_offsets must be two non-negative integers", "[0]"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,"4"]}}"#, data: four), ["tensor 'w': data_offsets must be two"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#, data: four), ["tensor 'w': data_offsets must be two"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}"#, data: four), ["tensor 'w': data_offsets must be two non-negative"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.5]}}"#, data: four), ["tensor 'w': data_offsets must be two"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#, data: four), ["tensor 'w': data_offsets [4, 0] end before they begin"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w': data_offsets [0, 4] span 4 bytes, but shape [3] of F32 needs 12"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, data: four), ["tensor 'w': data_offsets [0, 8] run past the end of the data section (4 bytes)"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,9007199254740992]}}"#, data: four), ["tensor 'w'", "run past the end"])
        assertRejected(craft(#"{"w":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w'", "more elements than can be addressed"])
        assertRejected(craft(#"{"w":{"dtype":"I64","shape":[4611686018427387904],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w'", "more elements than can be addressed"])
        assertRejected(craft(#"{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,4]}}"#, data: four), ["tensor 'w'", "3 elements of F4 do not fill whole bytes"])
    }

    func testRejectsOverlapsHolesAndUncoveredBytes() {
        let eight = [UInt8](repeating: 0, count: 8)
        assertRejected(craft(#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#, data: eight),
                       ["tensor 'b' data_offsets [2, 6] overlap tensor 'a' [0, 4]"])
        assertRejected(craft(#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, data: eight),
                       ["overlap tensor 'a'", "tensor 'b'"])
        assertRejected(craft(#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, data: eight),
                       ["bytes 2..<4 of the data section before tensor 'b' belong to no tensor"])
        assertRejected(craft(#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, data: eight),
                       ["bytes 0..<4 of the data section before tensor 'b' belong to no tensor"])
        assertRejected(craft(#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, data: eight),
                       ["the data section has 8 bytes but the tensors cover only 4"])
        assertRejected(craft("{}", data: [1]), ["the data section has 1 bytes but the tensors cover only 0"])
    }

    func testUnsupportedDTypesAreValidatedButNotRead() throws {
        let scratch = ScratchDirectory("pea-safetensors")
        let header = #"{"double":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},"mask":{"dtype":"BOOL","shape":[2],"data_offsets":[8,10]},"# +
            #""fp8":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[10,12]},"w":{"dtype":"F16","shape":[2],"data_offsets":[12,16]}}"#
        let path = scratch.write(craft(header, data: [UInt8](repeating: 0, count: 12) + [0, 0x3C, 0, 0xC0]), to: "mixed.safetensors")
        let file = try SafeTensorsFile(path: path)
        XCTAssertEqual(file.names, ["double", "fp8", "mask", "w"])
        XCTAssertEqual(try file.tensor("w").floats(), [1, -2])
        XCTAssertEqual(try file.dtypeName("double"), "F64")
        for name in ["double", "mask", "fp8"] {
            assertThrowsError(containing: [path, "tensor '\(name)' has unsupported dtype"]) { try file.info(name) }
            assertThrowsError(containing: [path, "unsupported dtype"]) { try file.tensor(name) }
            assertThrowsError(containing: [path, "unsupported dtype"]) { try file.withBytes(name) { $0.count } }
        }
        assertThrowsError(containing: ["unsupported dtype 'F64' (Pea reads F32, F16, BF16, I32, I64)"]) { try file.info("double") }
    }

    func testMissingTensorsAndWrongShapesNameFileAndTensor() throws {
        let scratch = ScratchDirectory("pea-safetensors")
        let path = scratch.file("w.safetensors")
        try SafeTensorsWriter.write([("conv.weight", HostTensor([1, 2, 3, 4, 5, 6], shape: [2, 3]))], to: path)
        let file = try SafeTensorsFile(path: path)
        assertThrowsError(containing: [path, "no tensor named 'conv.bias'"]) { try file.tensor("conv.bias") }
        assertThrowsError(containing: [path, "no tensor named 'x'"]) { try file.info("x") }
        assertThrowsError(containing: [path, "no tensor named 'x'"]) { try file.withBytes("x") { $0.count } }
        assertThrowsError(containing: [path, "tensor 'conv.weight' has shape [2, 3], expected [3, 2]"]) {
            try file.tensor("conv.weight", expecting: [3, 2])
        }
    }

    func testRejectsMissingFilesAndDirectories() {
        let scratch = ScratchDirectory("pea-safetensors")
        let missing = scratch.file("nothing.safetensors")
        assertThrowsError(containing: [missing, "cannot open", "No such file"]) { try SafeTensorsFile(path: missing) }
        assertThrowsError(containing: [scratch.path, "not a regular file"]) { try SafeTensorsFile(path: scratch.path) }
    }

    // MARK: - Writer failures

    func testWriterLeavesNothingBehindWhenItFails() throws {
        let scratch = ScratchDirectory("pea-safetensors")
        let inMissingFolder = scratch.file("no/such/folder/out.safetensors")
        assertThrowsError(containing: [inMissingFolder, "cannot create temporary file", "No such file"]) {
            try SafeTensorsWriter.write([("a", HostTensor([1], shape: [1]))], to: inMissingFolder)
        }
        XCTAssertEqual(scratch.entries(), [])

        let out = scratch.file("out.safetensors")
        assertThrowsError(containing: [out, "duplicate tensor name 'a'"]) {
            try SafeTensorsWriter.write([("a", HostTensor([1], shape: [1])), ("b", HostTensor([1], shape: [1])), ("a", HostTensor([2], shape: [1]))], to: out)
        }
        assertThrowsError(containing: [out, "'__metadata__' is reserved"]) {
            try SafeTensorsWriter.write([("__metadata__", HostTensor([1], shape: [1]))], to: out)
        }
        var broken = HostTensor([1, 2], shape: [2])
        broken.shape = [3]
        assertThrowsError(containing: [out, "tensor 'broken' holds 8 bytes, but shape [3] of f32 needs 12"]) {
            try SafeTensorsWriter.write([("broken", broken)], to: out)
        }
        XCTAssertEqual(scratch.entries(), [])

        // A failed rewrite leaves the existing file as it was; a successful one replaces it whole.
        try SafeTensorsWriter.write([("a", HostTensor([1], shape: [1]))], to: out)
        let before = readFileBytes(out)
        XCTAssertThrowsError(try SafeTensorsWriter.write([("a", HostTensor([1], shape: [1])), ("a", HostTensor([1], shape: [1]))], to: out))
        XCTAssertEqual(readFileBytes(out), before)
        try SafeTensorsWriter.write([("b", HostTensor([1, 2, 3], shape: [3], dtype: .bf16))], to: out)
        XCTAssertEqual(try SafeTensorsFile(path: out).names, ["b"])
        XCTAssertEqual(scratch.entries(), ["out.safetensors"])

        // Writing over a directory fails at the rename; the temporary file is removed.
        let folder = scratch.file("folder.safetensors")
        XCTAssertEqual(mkdir(folder, 0o755), 0)
        assertThrowsError(containing: [folder, "cannot rename"]) {
            try SafeTensorsWriter.write([("a", HostTensor([1], shape: [1]))], to: folder)
        }
        XCTAssertEqual(scratch.entries(), ["folder.safetensors", "out.safetensors"])
    }

    // MARK: - Sharded checkpoints

    private func writeShardedCheckpoint(in scratch: ScratchDirectory) throws -> String {
        try SafeTensorsWriter.write([("down.0.weight", HostTensor([1, 2, 3, 4], shape: [2, 2])),
                                     ("down.0.bias", HostTensor([5, 6], shape: [2]))],
                                    to: scratch.file("model-00001-of-00002.safetensors"))
        try SafeTensorsWriter.write([("up.0.weight", HostTensor([7, 8, 9], shape: [3], dtype: .f16))],
                                    to: scratch.file("model-00002-of-00002.safetensors"))
        return scratch.write("""
        {
          "metadata": {"total_size": 30, "format": "pt"},
          "weight_map": {
            "down.0.weight": "model-00001-of-00002.safetensors",
            "down.0.bias": "model-00001-of-00002.safetensors",
            "up.0.weight": "model-00002-of-00002.safetensors"
          }
        }
        """, to: "model.safetensors.index.json")
    }

    func testShardedCheckpointReadsAcrossShards() throws {
        let scratch = ScratchDirectory("pea-sharded")
        let index = try writeShardedCheckpoint(in: scratch)
        let weights = try SafeTensorsCollection(path: index)
        XCTAssertEqual(weights.path, index)
        XCTAssertEqual(weights.names, ["down.0.bias", "down.0.weight", "up.0.weight"])
        XCTAssertEqual(weights.metadata, ["total_size": "30", "format": "pt"])
        XCTAssertEqual(weights.filePaths, [scratch.file("model-00001-of-00002.safetensors"), scratch.file("model-00002-of-00002.safetensors")])
        XCTAssertTrue(weights.contains("up.0.weight"))
        XCTAssertFalse(weights.contains("up.1.weight"))
        XCTAssertEqual(try weights.tensor("down.0.weight", expecting: [2, 2]).floats(), [1, 2, 3, 4])
        XCTAssertEqual(try weights.tensor("up.0.weight").floats(), [7, 8, 9])
        XCTAssertEqual(try weights.info("up.0.weight").dtype, .f16)
        XCTAssertEqual(try weights.withBytes("down.0.bias") { $0.count }, 8)
        XCTAssertTrue(try weights.file(for: "down.0.weight") === weights.file(for: "down.0.bias"), "a shard is opened once")
        assertThrowsError(containing: [index, "no tensor named 'mid.weight'"]) { try weights.tensor("mid.weight") }
        assertThrowsError(containing: ["model-00001-of-00002.safetensors", "tensor 'down.0.weight' has shape [2, 2], expected [4]"]) {
            try weights.tensor("down.0.weight", expecting: [4])
        }

        // A single file through the same API.
        let single = try SafeTensorsCollection(path: scratch.file("model-00002-of-00002.safetensors"))
        XCTAssertEqual(single.names, ["up.0.weight"])
        XCTAssertEqual(try single.tensor("up.0.weight").floats(), [7, 8, 9])
        XCTAssertEqual(single.filePaths, [scratch.file("model-00002-of-00002.safetensors")])
    }

    func testShardedCheckpointErrorsNameTheIndexAndTheShard() throws {
        let scratch = ScratchDirectory("pea-sharded")
        _ = try writeShardedCheckpoint(in: scratch)
        let missingShard = scratch.write(#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00003-of-00003.safetensors"}}"#, to: "missing.index.json")
        assertThrowsError(containing: [missingShard, "shard 'model-00003-of-00003.safetensors'", "tensor 'b'", "does not exist"]) {
            try SafeTensorsCollection(path: missingShard)
        }
        let wrongShard = scratch.write(#"{"weight_map":{"up.0.weight":"model-00001-of-00002.safetensors"}}"#, to: "wrong.index.json")
        let weights = try SafeTensorsCollection(path: wrongShard)
        assertThrowsError(containing: [wrongShard, "tensor 'up.0.weight'", "model-00001-of-00002.safetensors", "has no tensor of that name"]) {
            try weights.tensor("up.0.weight")
        }
        let noMap = scratch.write(#"{"metadata":{}}"#, to: "nomap.index.json")
        assertThrowsError(containing: [noMap, "missing 'weight_map'"]) { try SafeTensorsCollection(path: noMap) }
        let badValue = scratch.write(#"{"weight_map":{"a":3}}"#, to: "badvalue.index.json")
        assertThrowsError(containing: [badValue, "weight_map entry 'a' must be a shard file name"]) { try SafeTensorsCollection(path: badValue) }
        let escaping = scratch.write(#"{"weight_map":{"a":"../x.safetensors"}}"#, to: "escaping.index.json")
        assertThrowsError(containing: [escaping, "outside the index's folder"]) { try SafeTensorsCollection(path: escaping) }
        let notJSON = scratch.write("{weight_map}", to: "broken.index.json")
        assertThrowsError(containing: [notJSON, "invalid JSON", "offset 1"]) { try SafeTensorsCollection(path: notJSON) }
        let corruptShard = scratch.write([1, 2, 3], to: "corrupt.safetensors")
        let pointsAtCorrupt = scratch.write(#"{"weight_map":{"a":"corrupt.safetensors"}}"#, to: "corrupt.index.json")
        let corrupt = try SafeTensorsCollection(path: pointsAtCorrupt)
        assertThrowsError(containing: [corruptShard, "too short"]) { try corrupt.tensor("a") }
    }

    func testOpenFindsVariantsAndIndexesInDiffusersOrder() throws {
        let scratch = ScratchDirectory("pea-open")
        let base = "diffusion_pytorch_model"
        assertThrowsError(containing: [scratch.path, "tried diffusion_pytorch_model.fp16.safetensors, diffusion_pytorch_model.fp16.safetensors.index.json, diffusion_pytorch_model.safetensors, diffusion_pytorch_model.safetensors.index.json"]) {
            try SafeTensorsCollection.open(folder: scratch.path, baseName: base, variant: "fp16")
        }
        assertThrowsError(containing: [scratch.path, "tried diffusion_pytorch_model.safetensors, diffusion_pytorch_model.safetensors.index.json"]) {
            try SafeTensorsCollection.open(folder: scratch.path, baseName: base, variant: nil)
        }

        try SafeTensorsWriter.write([("full", HostTensor([1], shape: [1]))], to: scratch.file("\(base).safetensors.index.json.shard"))
        scratch.write(#"{"weight_map":{"full":"\#(base).safetensors.index.json.shard"}}"#, to: "\(base).safetensors.index.json")
        XCTAssertEqual(try SafeTensorsCollection.open(folder: scratch.path, baseName: base, variant: "fp16").path, scratch.file("\(base).safetensors.index.json"))

        try SafeTensorsWriter.write([("full", HostTensor([1], shape: [1]))], to: scratch.file("\(base).safetensors"))
        XCTAssertEqual(try SafeTensorsCollection.open(folder: scratch.path, baseName: base, variant: "fp16").path, scratch.file("\(base).safetensors"))
        XCTAssertEqual(try SafeTensorsCollection.open(folder: scratch.path + "/", baseName: base).path, scratch.file("\(base).safetensors"))

        try SafeTensorsWriter.write([("half", HostTensor([1], shape: [1], dtype: .f16))], to: scratch.file("\(base).fp16.safetensors.index.json.shard"))
        scratch.write(#"{"weight_map":{"half":"\#(base).fp16.safetensors.index.json.shard"}}"#, to: "\(base).fp16.safetensors.index.json")
        XCTAssertEqual(try SafeTensorsCollection.open(folder: scratch.path, baseName: base, variant: "fp16").names, ["half"])

        try SafeTensorsWriter.write([("half", HostTensor([2], shape: [1], dtype: .f16))], to: scratch.file("\(base).fp16.safetensors"))
        let chosen = try SafeTensorsCollection.open(folder: scratch.path, baseName: base, variant: "fp16")
        XCTAssertEqual(chosen.path, scratch.file("\(base).fp16.safetensors"))
        XCTAssertEqual(try chosen.tensor("half").floats(), [2])
        XCTAssertEqual(try SafeTensorsCollection.open(folder: scratch.path, baseName: base, variant: nil).names, ["full"])
    }

    // MARK: - Fuzzing

    /// Thousands of random, truncated and mutated files: each must parse (and then read back within
    /// bounds) or throw a PEAError — never trap.
    func testFuzzedFilesParseOrThrowButNeverCrash() throws {
        var random = SplitMix64(seed: 0x5AFE_7E45)
        func below(_ n: Int) -> Int { Int(random.next() % UInt64(n)) }
        func pick<T>(_ options: [T]) -> T { options[below(options.count)] }

        let scratch = ScratchDirectory("pea-fuzz")
        let validPath = scratch.file("valid.safetensors")
        try SafeTensorsWriter.write(sampleTensors(), metadata: ["k": "v"], to: validPath)
        let valid = readFileBytes(validPath)!

        var accepted = 0
        var rejected = 0
        var opened = 0
        func attempt(_ bytes: [UInt8], throughFile: Bool = false) {
            bytes.withUnsafeBytes { buffer in
                do {
                    let header = try SafeTensorsFile.parseHeader(buffer, path: "fuzz")
                    accepted += 1
                    let dataLength = buffer.count - 8 - header.headerByteCount
                    for entry in header.entries.values {
                        XCTAssert(entry.begin >= 0 && entry.begin <= entry.end && entry.end <= dataLength)
                    }
                } catch {
                    rejected += 1
                    XCTAssertTrue(error is PEAError, "\(error)")
                }
            }
            guard throughFile else { return }
            let path = scratch.write(bytes, to: "case.safetensors")
            if let file = try? SafeTensorsFile(path: path) {
                opened += 1
                for name in file.names {
                    if let tensor = try? file.tensor(name) { XCTAssertEqual(tensor.bytes.count, try file.info(name).byteCount) }
                }
            }
        }

        // Random bytes, with and without a plausible length prefix.
        for _ in 0..<400 {
            let count = below(80)
            var bytes = (0..<count).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            if count >= 8, below(2) == 0 {
                let length = UInt64(below(count - 7))
                withUnsafeBytes(of: length.littleEndian) { for i in 0..<8 { bytes[i] = $0[i] } }
            }
            attempt(bytes)
        }
        // Every truncation of a valid file.
        for length in 0..<valid.count { attempt(Array(valid[0..<length]), throughFile: length % 16 == 0) }
        // Valid files with a few bytes changed (header length prefix included).
        for iteration in 0..<1200 {
            var bytes = valid
            for _ in 0..<(1 + below(4)) {
                let position = below(3) == 0 ? below(8) : below(bytes.count)
                bytes[position] = pick([0, 0xFF, 0x7F, UInt8(ascii: "\""), UInt8(ascii: "{"), UInt8(ascii: "9"), UInt8(ascii: ","), UInt8(truncatingIfNeeded: random.next())])
            }
            attempt(bytes, throughFile: iteration % 40 == 0)
        }
        // Random headers from the format's own vocabulary, with hostile numbers.
        let dtypes = ["F32", "F16", "BF16", "I32", "I64", "F64", "BOOL", "U8", "F4", "F6_E2M3", "F8_E4M3", "C64", "F17", "", "f32"]
        let numbers = ["0", "1", "2", "3", "4", "8", "-1", "1.5", "1e300", "-0", "9007199254740993", "18446744073709551616",
                       "4611686018427387904", "1099511627776", "NaN", "Infinity", "\"4\"", "null", "[]", "{}", "true"]
        for iteration in 0..<1500 {
            var members: [String] = []
            if below(4) == 0 { members.append(#""__metadata__":"# + pick([#"{"a":"b"}"#, "null", #"{"a":1}"#, "[]", "\"x\""])) }
            for index in 0..<below(5) {
                var fields: [String] = []
                if below(10) > 0 { fields.append(#""dtype":"# + (below(8) > 0 ? "\"\(pick(dtypes))\"" : pick(numbers))) }
                if below(10) > 0 { fields.append(#""shape":["# + (0..<below(4)).map { _ in pick(numbers) }.joined(separator: ",") + "]") }
                if below(10) > 0 { fields.append(#""data_offsets":["# + (0..<pick([2, 2, 2, 1, 3])).map { _ in pick(numbers) }.joined(separator: ",") + "]") }
                members.append("\"t\(index % 3)\":{" + fields.joined(separator: ",") + "}")
            }
            let header = "{" + members.joined(separator: ",") + "}"
            let data = [UInt8](repeating: 0x3C, count: pick([0, 1, 2, 4, 8, 12, 16, 64]))
            attempt(craft(header, data: data), throughFile: iteration % 50 == 0)
        }
        // Deep nesting, unbalanced and balanced.
        for depth in [10, 511, 600, 5_000, 100_000] {
            attempt(craft(String(repeating: "[", count: depth)))
            attempt(craft(String(repeating: "[", count: depth) + String(repeating: "]", count: depth)))
            attempt(craft("{\"a\":" + String(repeating: "{\"a\":", count: depth) + "1" + String(repeating: "}", count: depth + 1)))
        }
        XCTAssertGreaterThan(accepted, 10, "some random headers are valid")
        XCTAssertGreaterThan(rejected, 1000)
        XCTAssertGreaterThan(opened, 0)
    }
}
