import Foundation
import XCTest
@testable import PEADiffusion

/// PNGReader (a layer over PNGDecoder) against files Pillow wrote (tools/reference/make_png_fixtures.py),
/// PNGWriter against the reader and against the format's rules, and both against broken input.
final class PNGTests: XCTestCase {
    let directory = fixturesDirectory() + "/png"

    // MARK: - Reader vs Pillow

    func testReaderMatchesPillowPixelsAndText() throws {
        let expected = try SafeTensorsFile(path: directory + "/pixels.safetensors")
        let images = try XCTUnwrap(jsonList(expected.metadata["images"]))
        XCTAssertEqual(images.count, 4)
        for entry in images {
            let file = try XCTUnwrap(entry["file"] as? String)
            let image = try PNGReader.read(path: directory + "/" + file)
            XCTAssertEqual(image.width, entry["width"] as? Int, file)
            XCTAssertEqual(image.height, entry["height"] as? Int, file)
            XCTAssertEqual(image.channels, entry["mode"] as? String == "RGBA" ? 4 : 3, file)
            let pixels = try expected.tensor(String(file.dropLast(".png".count)))
            XCTAssertEqual(pixels.shape, [image.height, image.width, image.channels], file)
            XCTAssertEqual(image.pixels.map(Int.init), pixels.integers(), file)

            let pillowText = try XCTUnwrap(entry["text"] as? [String: String], file)
            XCTAssertEqual(Dictionary(image.textChunks.map { ($0.key, $0.value) }, uniquingKeysWith: { first, _ in first }),
                           pillowText, file)
            XCTAssertEqual(image.textChunks.count, pillowText.count, file)
        }
    }

    func testPillowFixturesUseEveryFilterType() throws {
        // Guards the fixture set: the reader test above decodes rows of all five filter types.
        let images = try XCTUnwrap(jsonList(try SafeTensorsFile(path: directory + "/pixels.safetensors").metadata["images"]))
        let filters = Set(images.flatMap { $0["filters"] as? [Int] ?? [] })
        XCTAssertEqual(filters, [0, 1, 2, 3, 4])
    }

    func testUnsupportedColorTypesAreRefusedNamingTheFile() throws {
        let metadata = try SafeTensorsFile(path: directory + "/pixels.safetensors").metadata
        let unsupported = try XCTUnwrap(jsonList(metadata["unsupported"]))
        XCTAssertEqual(unsupported.count, 2)
        for entry in unsupported {
            let path = directory + "/" + (try XCTUnwrap(entry["file"] as? String))
            let colorType = try XCTUnwrap(entry["color_type"] as? Int)
            assertThrowsError(containing: [path, "unsupported color type \(colorType)"]) { try PNGReader.read(path: path) }
        }
    }

    // MARK: - Writer

    func testRoundTripKeepsPixelsAndText() throws {
        let scratch = ScratchDirectory("pea-png")
        let (width, height) = (37, 23)
        let rgb = Self.testImage(width: width, height: height)
        let text = [(key: "parameters", value: "a café\nSteps: 20, Seed: 42"), (key: "Comment", value: "一只熊猫 🐼")]
        let path = scratch.file("image.png")
        try PNGWriter.write(rgb: rgb, width: width, height: height, textChunks: text, to: path)

        let image = try PNGReader.read(path: path)
        XCTAssertEqual(image.width, width)
        XCTAssertEqual(image.height, height)
        XCTAssertEqual(image.channels, 3)
        XCTAssertEqual(image.pixels, rgb)
        XCTAssertEqual(image.textChunks.map(\.key), ["parameters", "Comment"])
        XCTAssertEqual(image.textChunks.map(\.value), text.map(\.value))
        XCTAssertEqual(image.text("Comment"), "一只熊猫 🐼")
        XCTAssertEqual(scratch.entries(), ["image.png"], "the temporary file must be gone")

        // The adaptive filter choice really varies, so the round trip exercises several filter types.
        let chunks = try Self.chunks(XCTUnwrap(readFileBytes(path)))
        let data = chunks.filter { $0.type == "IDAT" }.flatMap(\.data)
        let filtered = try PNGFormat.inflate(data, limit: height * (1 + width * 3), what: "image data") { .invalidFile(path: path, reason: $0) }
        let used = Set((0..<height).map { filtered[$0 * (1 + width * 3)] })
        XCTAssertGreaterThanOrEqual(used.count, 3, "filter types used: \(used.sorted())")
    }

    func testWrittenChunkLayoutFollowsTheFormat() throws {
        let scratch = ScratchDirectory("pea-png")
        let path = scratch.file("layout.png")
        let latin1 = "café, 7.5, ÿ"
        let chinese = "一只可爱的熊猫"
        try PNGWriter.write(rgb: Self.testImage(width: 5, height: 3), width: 5, height: 3,
                            textChunks: [(key: "parameters", value: latin1), (key: "prompt", value: chinese)], to: path)
        let bytes = try XCTUnwrap(readFileBytes(path))
        XCTAssertEqual(Array(bytes[0..<8]), [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])

        let chunks = try Self.chunks(bytes)
        for chunk in chunks {
            XCTAssertEqual(chunk.storedCRC, Self.referenceCRC32(Array(chunk.type.utf8) + chunk.data), "CRC of \(chunk.type)")
        }
        XCTAssertEqual(chunks.map(\.type), ["IHDR", "tEXt", "iTXt", "IDAT", "IEND"])
        // width 5, height 3, bit depth 8, color type 2 (RGB), deflate, filter method 0, not interlaced
        XCTAssertEqual(chunks[0].data, [0, 0, 0, 5, 0, 0, 0, 3, 8, 2, 0, 0, 0])
        XCTAssertEqual(chunks[1].data, Array("parameters".utf8) + [0] + latin1.unicodeScalars.map { UInt8($0.value) })
        XCTAssertEqual(chunks[2].data, Array("prompt".utf8) + [0, 0, 0, 0, 0] + Array(chinese.utf8))
        XCTAssertEqual(chunks[4].data, [])
        XCTAssertEqual(chunks.reduce(8) { $0 + 12 + $1.data.count }, bytes.count, "nothing after IEND")
    }

    func testWritingIntoAMissingFolderFailsAndLeavesNothing() throws {
        let scratch = ScratchDirectory("pea-png")
        let path = scratch.file("missing/out.png")
        assertThrowsError(containing: [path]) {
            try PNGWriter.write(rgb: [1, 2, 3], width: 1, height: 1, to: path)
        }
        XCTAssertEqual(scratch.entries(), [])
    }

    func testFailedRenameRemovesTheTemporaryFile() throws {
        let scratch = ScratchDirectory("pea-png")
        let path = scratch.file("taken")
        XCTAssertEqual(mkdir(path, 0o755), 0)  // a directory: renaming a file over it fails
        assertThrowsError(containing: [path, "rename"]) {
            try PNGWriter.write(rgb: [1, 2, 3], width: 1, height: 1, to: path)
        }
        XCTAssertEqual(scratch.entries(), ["taken"])
    }

    func testOverwritingReplacesTheWholeFile() throws {
        let scratch = ScratchDirectory("pea-png")
        let path = scratch.file("image.png")
        try PNGWriter.write(rgb: Self.testImage(width: 40, height: 30), width: 40, height: 30, to: path)
        try PNGWriter.write(rgb: [9, 8, 7], width: 1, height: 1, textChunks: [(key: "parameters", value: "x")], to: path)
        let image = try PNGReader.read(path: path)
        XCTAssertEqual(image.pixels, [9, 8, 7])
        XCTAssertEqual(image.text("parameters"), "x")
        XCTAssertEqual(scratch.entries(), ["image.png"])
    }

    func testWriterRejectsInvalidArgumentsNamingThePath() {
        let path = "/tmp/never-written.png"
        let cases: [(rgb: [UInt8], width: Int, height: Int, text: [(key: String, value: String)], message: String)] = [
            ([1, 2, 3, 4], 1, 1, [], "RGB bytes"),
            ([], 0, 1, [], "0×1"),
            ([1, 2, 3], 1, 1, [(key: "", value: "v")], "keyword"),
            ([1, 2, 3], 1, 1, [(key: String(repeating: "k", count: 80), value: "v")], "keyword"),
            ([1, 2, 3], 1, 1, [(key: "提示", value: "v")], "keyword"),
            ([1, 2, 3], 1, 1, [(key: " parameters", value: "v")], "keyword"),
            ([1, 2, 3], 1, 1, [(key: "parameters", value: "a\u{0}b")], "NUL"),
        ]
        for testCase in cases {
            assertThrowsError(containing: [path, testCase.message]) {
                try PNGWriter.write(rgb: testCase.rgb, width: testCase.width, height: testCase.height,
                                    textChunks: testCase.text, to: path)
            }
        }
        XCTAssertFalse(fileExists(path))
    }

    // MARK: - Broken input

    func testEveryTruncationGivesAnErrorNamingTheFile() throws {
        let good = try PNGWriter.encode(rgb: Self.testImage(width: 6, height: 4), width: 6, height: 4,
                                        textChunks: [(key: "parameters", value: "p")], path: "x")
        for length in 0..<good.count {
            assertThrowsError(containing: ["cut.png"]) { try PNGReader.decode(Array(good[0..<length]), path: "cut.png") }
        }
        XCTAssertNoThrow(try PNGReader.decode(good, path: "whole.png"))
    }

    func testCorruptFilesGiveClearErrors() throws {
        let rgb = Self.testImage(width: 6, height: 4)
        let good = try PNGWriter.encode(rgb: rgb, width: 6, height: 4, textChunks: [], path: "x")
        let chunks = try Self.chunks(good)
        let idat = try XCTUnwrap(chunks.first { $0.type == "IDAT" })

        var signature = good
        signature[1] = UInt8(ascii: "J")
        assertThrowsError(containing: ["bad.png", "signature"]) { try PNGReader.decode(signature, path: "bad.png") }

        var flipped = good
        flipped[idat.offset + 8 + 2] ^= 0x10  // a data byte of IDAT; its CRC no longer matches
        assertThrowsError(containing: ["bad.png", "CRC", "IDAT"]) { try PNGReader.decode(flipped, path: "bad.png") }

        // Well-formed chunks with bad contents: the CRCs are recomputed, so the check behind them is reached.
        func rebuilt(header: [UInt8]? = nil, imageData: [UInt8]? = nil) -> [UInt8] {
            var file = PNGFormat.signature
            for chunk in chunks {
                let data = chunk.type == "IHDR" ? (header ?? chunk.data) : chunk.type == "IDAT" ? (imageData ?? chunk.data) : chunk.data
                PNGFormat.appendChunk(chunk.type, data, to: &file)
            }
            return file
        }
        XCTAssertEqual(rebuilt(), good)
        let header = chunks[0].data
        func headerWith(_ index: Int, _ value: UInt8) -> [UInt8] {
            var changed = header
            changed[index] = value
            return changed
        }
        assertThrowsError(containing: ["bad.png", "interlaced"]) { try PNGReader.decode(rebuilt(header: headerWith(12, 1)), path: "bad.png") }
        assertThrowsError(containing: ["bad.png", "bit depth 16"]) { try PNGReader.decode(rebuilt(header: headerWith(8, 16)), path: "bad.png") }
        assertThrowsError(containing: ["bad.png", "color type 4"]) { try PNGReader.decode(rebuilt(header: headerWith(9, 4)), path: "bad.png") }
        assertThrowsError(containing: ["bad.png", "zlib"]) {
            try PNGReader.decode(rebuilt(imageData: idat.data.map { $0 ^ 0x5A }), path: "bad.png")
        }

        // A valid zlib stream of the right size with an undefined filter type (7) in row 2.
        var filtered = PNGFormat.filterRows(rgb, width: 6, height: 4, channels: 3)
        filtered[2 * (1 + 6 * 3)] = 7
        let badFilter = rebuilt(imageData: try PNGFormat.deflate(filtered, path: "x"))
        assertThrowsError(containing: ["bad.png", "row 2", "filter type 7"]) { try PNGReader.decode(badFilter, path: "bad.png") }

        // One row short, and one byte too many.
        let short = rebuilt(imageData: try PNGFormat.deflate(Array(filtered.dropLast(19)), path: "x"))
        assertThrowsError(containing: ["bad.png", "inflate to"]) { try PNGReader.decode(short, path: "bad.png") }
        let long = rebuilt(imageData: try PNGFormat.deflate(filtered + [0], path: "x"))
        assertThrowsError(containing: ["bad.png", "more than"]) { try PNGReader.decode(long, path: "bad.png") }

        assertThrowsError(containing: ["/no/such/file.png", "cannot open"]) { try PNGReader.read(path: "/no/such/file.png") }
    }

    func testDecoderReadsTextOnlyWhenAskedAndSkipsBadTextOtherwise() throws {
        let rgb = Self.testImage(width: 4, height: 2)
        let good = try PNGWriter.encode(rgb: rgb, width: 4, height: 2,
                                        textChunks: [(key: "parameters", value: "p"), (key: "prompt", value: "熊猫")], path: "x")
        let withText = try good.withUnsafeBytes { try PNGDecoder.decode($0, path: "t.png", readText: true) }
        XCTAssertEqual(withText.textChunks.map(\.key), ["parameters", "prompt"])
        XCTAssertEqual(withText.textChunks.map(\.value), ["p", "熊猫"])
        let plain = try good.withUnsafeBytes { try PNGDecoder.decode($0, path: "t.png") }
        XCTAssertTrue(plain.textChunks.isEmpty)
        XCTAssertEqual(plain.rgb().pixels, rgb)

        // An iTXt whose text is not UTF-8: an error when text is read, skipped like any ancillary chunk when not
        // (the training pipeline does not read text).
        var bad = PNGFormat.signature
        for chunk in try Self.chunks(good) {
            if chunk.type == "IDAT" { PNGFormat.appendChunk("iTXt", Array("note".utf8) + [0, 0, 0, 0, 0, 0xFF], to: &bad) }
            PNGFormat.appendChunk(chunk.type, chunk.data, to: &bad)
        }
        assertThrowsError(containing: ["bad.png", "iTXt 'note'", "UTF-8"]) { try PNGReader.decode(bad, path: "bad.png") }
        XCTAssertEqual(try bad.withUnsafeBytes { try PNGDecoder.decode($0, path: "bad.png") }.rgb().pixels, rgb)
    }

    func testRandomByteDamageNeverCrashes() throws {
        let good = try PNGWriter.encode(rgb: Self.testImage(width: 9, height: 5), width: 9, height: 5,
                                        textChunks: [(key: "parameters", value: "熊猫")], path: "x")
        var random = SplitMix64(seed: 11)
        for _ in 0..<500 {
            var damaged = good
            for _ in 0..<(1 + Int(random.next() % 3)) {
                damaged[Int(random.next() % UInt64(damaged.count))] = UInt8(truncatingIfNeeded: random.next())
            }
            do {
                _ = try PNGReader.decode(damaged, path: "damaged.png")
            } catch {
                XCTAssertTrue("\(error)".contains("damaged.png"), "\(error)")
            }
        }
    }

    // MARK: - Helpers

    /// Smooth gradients, a band of noise and a repeated row: content for which different filters win.
    static func testImage(width: Int, height: Int) -> [UInt8] {
        var random = SplitMix64(seed: UInt64(width * 1000 + height))
        var rgb: [UInt8] = []
        for y in 0..<height {
            for x in 0..<width {
                if y % 5 == 3 {
                    rgb += (0..<3).map { _ in UInt8(truncatingIfNeeded: random.next()) }
                } else {
                    rgb += [UInt8(truncatingIfNeeded: x * 7 + y), UInt8(truncatingIfNeeded: x * y), UInt8(truncatingIfNeeded: 200 - 3 * y)]
                }
            }
        }
        if height > 2 {  // row 2 repeats row 1
            rgb.replaceSubrange((2 * width * 3)..<(3 * width * 3), with: rgb[(width * 3)..<(2 * width * 3)])
        }
        return rgb
    }

    struct Chunk {
        let offset: Int
        let type: String
        let data: [UInt8]
        let storedCRC: UInt32
    }

    /// The chunks of a well-formed file, parsed here independently of PNGReader.
    static func chunks(_ bytes: [UInt8]) throws -> [Chunk] {
        var chunks: [Chunk] = []
        var offset = 8
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(bytes[at + $1]) } }
        while offset < bytes.count {
            let length = Int(u32(offset))
            let type = String(decoding: bytes[(offset + 4)..<(offset + 8)], as: UTF8.self)
            let data = Array(bytes[(offset + 8)..<(offset + 8 + length)])
            chunks.append(Chunk(offset: offset, type: type, data: data, storedCRC: u32(offset + 8 + length)))
            offset += 12 + length
        }
        return chunks
    }

    /// CRC-32 (ISO 3309, reflected polynomial 0xEDB88320) bit by bit, as the PNG specification defines it;
    /// an independent check of the CRCs the writer gets from zlib.
    static func referenceCRC32(_ bytes: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ 0xEDB8_8320 : crc >> 1 }
        }
        return ~crc
    }

    func jsonList(_ text: String?) throws -> [[String: Any]]? {
        guard let text else { return nil }
        return try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]]
    }
}
