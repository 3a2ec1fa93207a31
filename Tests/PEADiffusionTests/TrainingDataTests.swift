import XCTest
@testable import PEADiffusion

/// The training data pipeline (Sources/PEADiffusion/Training/Data, IO/PNGDecoder.swift): image decoding and the
/// training transform against Pillow/torchvision (tools/reference/make_image_fixtures.py), tar shards (made by
/// Python's tarfile, and byte by byte here), brace expansion, manifests, shuffling, skips, resume, the latent
/// cache.
final class TrainingDataTests: XCTestCase {
    static let directory = fixturesDirectory() + "/images"

    struct FixtureImage {
        let name: String, file: String, width: Int, height: Int, format: String, resolutions: [Int]
        let resized: [Int: [Int]], crop: [Int: [Int]]
    }

    static func fixtureImages() throws -> [FixtureImage] {
        let tensors = try SafeTensorsFile(path: directory + "/tensors.safetensors")
        let list = try XCTUnwrap(JSONValue.parse(XCTUnwrap(tensors.metadata["images"])).arrayValue)
        return try list.map { value in
            let entry = try XCTUnwrap(value.objectValue)
            let file = try XCTUnwrap(entry["file"]?.stringValue)
            func sizes(_ key: String) throws -> [Int: [Int]] {
                var result: [Int: [Int]] = [:]
                for (r, pair) in try XCTUnwrap(entry[key]?.objectValue) {
                    result[try XCTUnwrap(Int(r))] = try XCTUnwrap(pair.arrayValue).map { try XCTUnwrap($0.intValue) }
                }
                return result
            }
            return FixtureImage(name: String(file[..<file.lastIndex(of: ".")!]), file: file,
                                width: try XCTUnwrap(entry["width"]?.intValue), height: try XCTUnwrap(entry["height"]?.intValue),
                                format: try XCTUnwrap(entry["format"]?.stringValue),
                                resolutions: try XCTUnwrap(entry["resolutions"]?.arrayValue).map { try XCTUnwrap($0.intValue) },
                                resized: try sizes("resized"), crop: try sizes("crop"))
        }
    }

    /// An 8-bit RGB PNG the script saved from Pillow's result.
    static func expectedImage(_ name: String) throws -> RGBImage {
        let png = try PNGReader.read(path: directory + "/expected/" + name + ".png")
        XCTAssertEqual(png.channels, 3, name)
        return RGBImage(width: png.width, height: png.height, pixels: png.pixels)
    }

    static func maxDifference(_ a: [UInt8], _ b: [UInt8]) -> Int {
        zip(a, b).map { abs(Int($0) - Int($1)) }.max() ?? 0
    }

    // MARK: - Decoding vs Pillow

    func testFixtureSetCoversTheKindsOfImages() throws {
        let images = try Self.fixtureImages()
        XCTAssertEqual(images.filter { $0.format == "JPEG" }.count, 5)
        XCTAssertGreaterThanOrEqual(images.filter { $0.format == "PNG" }.count, 17)
        var kinds = Set<String>()
        for image in images where image.format == "PNG" {
            let decoded = try PNGDecoder.decode(path: Self.directory + "/" + image.file)
            kinds.insert("\(decoded.colorType)/\(decoded.bitDepth)\(decoded.interlaced ? "i" : "")")
        }
        // every colour type; bit depths 1, 2, 4, 8, 16; interlaced files
        XCTAssertTrue(["0/1i", "0/2", "0/4i", "0/8", "0/16", "2/8", "2/16i", "3/2i", "3/4", "3/8", "4/8", "4/16", "6/8", "6/16"]
            .allSatisfy(kinds.contains), "\(kinds.sorted())")
    }

    func testPNGDecoderMatchesPillowConvertRGBExactly() throws {
        let tensors = try SafeTensorsFile(path: Self.directory + "/tensors.safetensors")
        for image in try Self.fixtureImages() where image.format == "PNG" {
            let path = Self.directory + "/" + image.file
            let decoded = try PNGDecoder.decode(path: path)
            XCTAssertEqual([decoded.width, decoded.height], [image.width, image.height], image.name)
            XCTAssertEqual(decoded.interlaced, image.name.contains("adam7"), image.name)
            let expected = try Self.expectedImage(image.name + ".rgb")
            XCTAssertTrue(decoded.rgb().pixels == expected.pixels,
                          "\(image.name): RGB differs from Pillow's convert(\"RGB\"), max |Δ| \(Self.maxDifference(decoded.rgb().pixels, expected.pixels))")
            XCTAssertTrue(try ImageDecoder.decodeRGB(path: path).pixels == expected.pixels, image.name)
            if tensors.contains(image.name + ".samples") {
                let samples = try tensors.tensor(image.name + ".samples")
                XCTAssertEqual(samples.shape, [decoded.height, decoded.width, decoded.channels], image.name)
                XCTAssertTrue(decoded.samples.map(Int.init) == samples.integers(), "\(image.name): stored samples differ")
            }
        }
    }

    func testJPEGDecodeMatchesPillowWithinOneLevel() throws {
        var exact = 0, total = 0
        for image in try Self.fixtureImages() where image.format == "JPEG" {
            let decoded = try ImageDecoder.decodeRGB(path: Self.directory + "/" + image.file)
            let expected = try Self.expectedImage(image.name + ".rgb")
            XCTAssertEqual([decoded.width, decoded.height], [expected.width, expected.height], image.name)
            XCTAssertLessThanOrEqual(Self.maxDifference(decoded.pixels, expected.pixels), 1, image.name)
            exact += zip(decoded.pixels, expected.pixels).filter { $0 == $1 }.count
            total += expected.pixels.count
        }
        print("JPEG decode vs Pillow: \(exact) of \(total) values equal, the rest within 1")
        // The same libjpeg-turbo IDCT and upsampling: in practice every value is equal.
        XCTAssertGreaterThan(Double(exact) / Double(total), 0.999, "\(exact) of \(total) values equal")
    }

    // MARK: - The transform vs torchvision

    func testResizeAndCenterCropMatchTorchvisionExactly() throws {
        var compared = 0
        for image in try Self.fixtureImages() {
            let source = try Self.expectedImage(image.name + ".rgb")  // Pillow's RGB: identical input
            for r in image.resolutions {
                let size = TrainingImageTransform.resizedSize(width: source.width, height: source.height, shorterSide: r)
                XCTAssertEqual([size.width, size.height], image.resized[r], "\(image.name) r\(r): Resize's size")
                XCTAssertEqual([TrainingImageTransform.cropOffset(size.height, r), TrainingImageTransform.cropOffset(size.width, r)],
                               image.crop[r], "\(image.name) r\(r): CenterCrop's offsets")
                let resized = TrainingImageTransform.resizeShorterSide(source, to: r)
                let cropped = TrainingImageTransform.centerCrop(resized, size: r)
                let expected = try Self.expectedImage("\(image.name).r\(r)")
                XCTAssertTrue(cropped.pixels == expected.pixels,
                              "\(image.name) r\(r): max |Δ| \(Self.maxDifference(cropped.pixels, expected.pixels))")
                compared += 1
            }
        }
        XCTAssertGreaterThanOrEqual(compared, 25)
    }

    func testWholeTransformMatchesTorchvisionTensors() throws {
        let tensors = try SafeTensorsFile(path: Self.directory + "/tensors.safetensors")
        for image in try Self.fixtureImages() {
            let fromPillowRGB = try Self.expectedImage(image.name + ".rgb")
            let fromFile = try ImageDecoder.decodeRGB(path: Self.directory + "/" + image.file)
            for r in image.resolutions {
                let expected = try tensors.tensor("\(image.name).r\(r)")
                XCTAssertEqual(expected.shape, [3, r, r])
                // Same 8-bit input: the f32 values are bit-identical (x/255, −0.5, /0.5 in float32).
                let ours = TrainingImageTransform.tensor(from: fromPillowRGB, resolution: r)
                XCTAssertEqual(ours.shape, [3, r, r])
                XCTAssertTrue(ours.floats() == expected.floats(), "\(image.name) r\(r): f32 values differ")
                // From the file through our decoder: exact for PNG; JPEG within 1/255 on the [0, 1] scale.
                let full = TrainingImageTransform.tensor(from: fromFile, resolution: r).floats()
                let worst = zip(full, expected.floats()).map { abs($0 - $1) }.max() ?? 0
                if image.format == "PNG" {
                    XCTAssertEqual(worst, 0, "\(image.name) r\(r)")
                } else {
                    XCTAssertLessThanOrEqual(worst, 2.0 / 255 + 1e-6, "\(image.name) r\(r)")  // [-1, 1] scale
                }
            }
        }
    }

    func testCropRoundsHalvesToEvenAsPython() {
        // Python's round: round(0.5) == 0, round(1.5) == 2, round(2.5) == 2.
        XCTAssertEqual(TrainingImageTransform.cropOffset(17, 16), 0)
        XCTAssertEqual(TrainingImageTransform.cropOffset(19, 16), 2)
        XCTAssertEqual(TrainingImageTransform.cropOffset(21, 16), 2)
    }

    // MARK: - Corrupt images

    func testCorruptPNGsAreErrorsNamingTheFile() throws {
        let path = Self.directory + "/png_rgb.png"
        let good = try XCTUnwrap(readFileBytes(path))
        var flipped = good
        flipped[good.count - 20] ^= 0x40  // inside the last IDAT's data: CRC mismatch
        assertThrowsError(containing: ["bad.png", "CRC mismatch"]) {
            try flipped.withUnsafeBytes { try PNGDecoder.decode($0, path: "bad.png") }
        }
        assertThrowsError(containing: ["cut.png", "truncated"]) {
            try Array(good.prefix(good.count / 2)).withUnsafeBytes { try PNGDecoder.decode($0, path: "cut.png") }
        }
        assertThrowsError(containing: ["x.png", "not a JPEG or PNG"]) {
            try Array("GIF89a......".utf8).withUnsafeBytes { try ImageDecoder.decodeRGB($0, name: "x.png") }
        }
    }

    func testCorruptJPEGsAreErrorsNamingTheFile() throws {
        let good = try XCTUnwrap(readFileBytes(Self.directory + "/jpeg_rgb_420.jpg"))
        assertThrowsError(containing: ["cut.jpg", "cannot decode JPEG", "Premature end"]) {
            try Array(good.prefix(good.count - 200)).withUnsafeBytes { try ImageDecoder.decodeRGB($0, name: "cut.jpg") }
        }
        var garbage = Array(good.prefix(40))
        garbage += [UInt8](repeating: 0x55, count: 300)
        assertThrowsError(containing: ["junk.jpg", "cannot decode JPEG"]) {
            try garbage.withUnsafeBytes { try ImageDecoder.decodeRGB($0, name: "junk.jpg") }
        }
        // the decoder is usable after errors (no state left behind by the longjmp)
        XCTAssertNoThrow(try good.withUnsafeBytes { try ImageDecoder.decodeRGB($0, name: "good.jpg") })
    }

    // MARK: - Tar archives

    func testTarReaderListsWhatTarfileWrote() throws {
        let listing = try JSONValue.parse(XCTUnwrap(readFileBytes(Self.directory + "/tars.json"))).objectValue!
        XCTAssertEqual(listing.count, 2)
        for (shard, value) in listing {
            let expected = try XCTUnwrap(value.objectValue?["entries"]?.arrayValue)
            let entries = try TarArchive(path: Self.directory + "/" + shard).entries()
            XCTAssertEqual(entries.map(\.name), expected.map { $0.objectValue!["name"]!.stringValue! }, shard)
            XCTAssertEqual(entries.map(\.size), expected.map { $0.objectValue!["size"]!.intValue! }, shard)
            XCTAssertTrue(entries.allSatisfy { $0.kind == .file }, shard)
        }
        // the data are the members' bytes
        let gnu = try TarArchive(path: Self.directory + "/shard_gnu.tar").entries()
        XCTAssertEqual(gnu[0].bytes, readFileBytes(Self.directory + "/jpeg_rgb_420.jpg"))
        XCTAssertGreaterThan(gnu[2].name.utf8.count, 100)  // from a GNU 'L' entry
    }

    func testTarReaderHandlesUstarPrefixBase256AndDirectories() throws {
        var tar = TarBuilder()
        tar.add(name: "dir/", data: [], type: "5")
        tar.add(name: "file.txt", prefix: "some/prefix", data: Array("hello".utf8))
        tar.add(name: "big.bin", data: Array(repeating: 7, count: 1000), base256Size: true)
        let entries = try TarArchive(bytes: tar.finish(), path: "t.tar").entries()
        XCTAssertEqual(entries.map(\.name), ["dir/", "some/prefix/file.txt", "big.bin"])
        XCTAssertEqual(entries.map(\.kind), [.directory, .file, .file])
        XCTAssertEqual(entries[1].bytes, Array("hello".utf8))
        XCTAssertEqual(entries[2].bytes, Array(repeating: 7, count: 1000))
    }

    func testCorruptTarsAreErrorsNamingTheFile() throws {
        var tar = TarBuilder()
        tar.add(name: "a.txt", data: Array("caption".utf8))
        let good = tar.finish()
        var badChecksum = good
        badChecksum[10] ^= 1
        assertThrowsError(containing: ["bad.tar", "checksum"]) { try TarArchive(bytes: badChecksum, path: "bad.tar").entries() }
        assertThrowsError(containing: ["cut.tar", "truncated"]) { try TarArchive(bytes: Array(good.prefix(600)), path: "cut.tar").entries() }
        assertThrowsError(containing: ["z.tar.gz", "gzip"]) { try TarArchive(bytes: [0x1F, 0x8B, 8, 0], path: "z.tar.gz") }
    }

    // MARK: - Brace expansion

    func testShardPatternsExpandLikeBraceexpand() throws {
        XCTAssertEqual(try ShardPattern.expand("data/shard-{000000..000003}.tar"),
                       ["data/shard-000000.tar", "data/shard-000001.tar", "data/shard-000002.tar", "data/shard-000003.tar"])
        XCTAssertEqual(try ShardPattern.expand("s{8..11}"), ["s8", "s9", "s10", "s11"])
        XCTAssertEqual(try ShardPattern.expand("s{08..10}"), ["s08", "s09", "s10"])
        XCTAssertEqual(try ShardPattern.expand("{3..1}"), ["3", "2", "1"])
        XCTAssertEqual(try ShardPattern.expand("{0..10..5}"), ["0", "5", "10"])
        XCTAssertEqual(try ShardPattern.expand("{a..c}"), ["a", "b", "c"])
        XCTAssertEqual(try ShardPattern.expand("{a,b}/{1..2}.tar"), ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"])
        XCTAssertEqual(try ShardPattern.expand("x{a,b{1,2}}y"), ["xay", "xb1y", "xb2y"])
        XCTAssertEqual(try ShardPattern.expand("a.tar::b-{0..1}.tar"), ["a.tar", "b-0.tar", "b-1.tar"])
        XCTAssertEqual(try ShardPattern.expand(["a{1,2}", "c::d"]), ["a1", "a2", "c", "d"])
        XCTAssertEqual(try ShardPattern.expand("lit{abc}.tar"), ["lit{abc}.tar"])
        XCTAssertEqual(try ShardPattern.expand("e\\{1,2\\}"), ["e{1,2}"])
        XCTAssertEqual(try ShardPattern.expand("{,x}y"), ["y", "xy"])
        assertThrowsError(containing: ["shard-{0..3.tar", "never closed"]) { try ShardPattern.expand("shard-{0..3.tar") }
        assertThrowsError(containing: ["a}b", "has no '{'"]) { try ShardPattern.expand("a}b") }
        assertThrowsError(containing: ["more than"]) { try ShardPattern.expand("{0..99999}{0..999}") }
    }

    func testDataSourceParsing() throws {
        XCTAssertEqual(try TrainingDataSource.parse(["data/train.jsonl"]), .manifest(path: "data/train.jsonl"))
        XCTAssertEqual(try TrainingDataSource.parse(["s-{0..1}.tar::t.tar", "u.tar"]), .shards(["s-0.tar", "s-1.tar", "t.tar", "u.tar"]))
        assertThrowsError(containing: ["one .jsonl manifest"]) { try TrainingDataSource.parse(["a.jsonl", "b.tar"]) }
        assertThrowsError(containing: ["no manifest"]) { try TrainingDataSource.parse([]) }
    }

    // MARK: - Manifests

    func testManifestParsingAndErrorsNameFileAndLine() throws {
        let scratch = ScratchDirectory("pea-manifest")
        let path = scratch.write("\u{FEFF}{\"image\": \"a.jpg\", \"text\": \"猫\", \"text_en\": \"cat\", \"language_specific\": true}\r\n\n"
                                 + "{\"image\": \"/abs/b.png\", \"text_en\": \"dog\", \"language_specific\": 0}\n"
                                 + "   \n{\"image\": \"sub/c.png\", \"text\": \"\", \"extra\": [1, 2]}", to: "m.jsonl")
        let manifest = try TrainingManifest(path: path)
        XCTAssertEqual(manifest.records, [
            TrainingRecord(id: scratch.path + "/a.jpg", text: "猫", textEN: "cat", languageSpecific: true),
            TrainingRecord(id: "/abs/b.png", text: nil, textEN: "dog", languageSpecific: false),
            TrainingRecord(id: scratch.path + "/sub/c.png", text: nil, textEN: nil, languageSpecific: nil),
        ])
        XCTAssertEqual(manifest.lines, [1, 3, 5])

        let bad = scratch.write("{\"image\": \"a.jpg\", \"text\": \"x\"}\n{\"image\": \"b.jpg\", \"text\": \"y\"\n", to: "bad.jsonl")
        assertThrowsError(containing: [bad, "line 2", "invalid JSON"]) { try TrainingManifest(path: bad) }
        let array = scratch.write("{\"image\": \"a.jpg\"}\n[1]\n", to: "array.jsonl")
        assertThrowsError(containing: [array, "line 2", "expected a JSON object"]) { try TrainingManifest(path: array) }
        let noImage = scratch.write("{\"text\": \"x\"}\n", to: "noimage.jsonl")
        assertThrowsError(containing: [noImage, "line 1", "no \"image\""]) { try TrainingManifest(path: noImage) }
        let empty = scratch.write("\n\n", to: "empty.jsonl")
        assertThrowsError(containing: [empty, "no records"]) { try TrainingManifest(path: empty) }
    }

    /// A manifest over fixture images: 6 good records, one without caption, one missing file, one corrupt image.
    func makeManifest(_ scratch: ScratchDirectory, goodCount: Int = 6) throws -> String {
        let good = ["jpeg_rgb_420.jpg", "png_rgb.png", "png_palette.png", "jpeg_gray.jpg", "raw_rgba8.png", "png_la.png"]
        var lines: [String] = []
        for index in 0..<goodCount {
            lines.append("{\"image\": \"\(Self.directory)/\(good[index % good.count])\", \"text\": \"caption \(index)\", \"text_en\": \"en \(index)\"}")
        }
        let jpeg = try XCTUnwrap(readFileBytes(Self.directory + "/jpeg_rgb_420.jpg"))
        scratch.write(Array(jpeg.prefix(500)), to: "truncated.jpg")
        lines.append("{\"image\": \"truncated.jpg\", \"text\": \"corrupt\"}")
        lines.append("{\"image\": \"missing.jpg\", \"text\": \"missing file\"}")
        lines.append("{\"image\": \"\(Self.directory)/png_gray.png\", \"text_en\": \"no target caption\"}")
        return scratch.write(lines.joined(separator: "\n") + "\n", to: "train.jsonl")
    }

    func testManifestDatasetSkipsAndCountsBadRecordsAndLoopsEpochs() throws {
        let scratch = ScratchDirectory("pea-dataset")
        let path = try makeManifest(scratch)
        let dataset = try TrainingDataset(source: .manifest(path: path), resolution: 8, seed: 7, shuffle: false)
        var skips: [TrainingSkip] = []
        dataset.onSkip = { skips.append($0) }
        XCTAssertEqual(dataset.recordCount, 9)
        let first = try dataset.nextBatch(6)
        XCTAssertEqual(first.map(\.text), (0..<6).map { "caption \($0)" })
        XCTAssertEqual(first.map(\.textEN), (0..<6).map { "en \($0)" })
        XCTAssertTrue(first.allSatisfy { $0.image?.shape == [3, 8, 8] && $0.image!.floats().allSatisfy { abs($0) <= 1 } })
        XCTAssertEqual(dataset.skipped.total, 0)
        // The three bad records close epoch 0; the next sample is epoch 1's first.
        XCTAssertEqual(try dataset.next().text, "caption 0")
        XCTAssertEqual(dataset.epoch, 1)
        XCTAssertEqual(dataset.skipped, TrainingSkipCounts([.undecodableImage: 1, .unreadableImage: 1, .missingCaption: 1]))
        XCTAssertEqual(dataset.skipped.description, "1 missingCaption, 1 unreadableImage, 1 undecodableImage")
        XCTAssertEqual(skips.map(\.reason), [.undecodableImage, .unreadableImage, .missingCaption])
        XCTAssertTrue(skips.contains { $0.reason == .undecodableImage && $0.message.contains("truncated.jpg") && $0.message.contains("Premature end") })
        XCTAssertTrue(skips.contains { $0.reason == .unreadableImage && $0.message.contains("missing.jpg") })
    }

    func testShufflingIsDeterministicPerSeedAndReshufflesEachEpoch() throws {
        let scratch = ScratchDirectory("pea-shuffle")
        let path = try makeManifest(scratch, goodCount: 24)
        func ids(seed: UInt64, count: Int) throws -> [String] {
            let dataset = try TrainingDataset(source: .manifest(path: path), resolution: 4, seed: seed)
            dataset.cachedGeometry = { _ in Self.anyGeometry }  // order only
            return try dataset.nextBatch(count).map(\.text)
        }
        // Without image decoding the corrupt and missing images are not detected: 26 samples per epoch.
        let n = 26
        let a = try ids(seed: 1, count: 3 * n), b = try ids(seed: 1, count: 3 * n), c = try ids(seed: 2, count: 3 * n)
        XCTAssertEqual(a, b)
        XCTAssertNotEqual(a, c)
        let epochs = (0..<3).map { Array(a[($0 * n)..<(($0 + 1) * n)]) }
        for epoch in epochs { XCTAssertEqual(Set(epoch), Set((0..<24).map { "caption \($0)" } + ["corrupt", "missing file"])) }
        XCTAssertNotEqual(epochs[0], epochs[1])
        XCTAssertNotEqual(epochs[1], epochs[2])
        // seed + epoch: epoch 1 of seed 1 is epoch 0 of seed 2
        XCTAssertEqual(epochs[1], Array(c[0..<n]))
        let unshuffled = try TrainingDataset(source: .manifest(path: path), resolution: 4, seed: 1, shuffle: false)
        unshuffled.cachedGeometry = { _ in Self.anyGeometry }
        XCTAssertEqual(try unshuffled.nextBatch(n).map(\.text), (0..<24).map { "caption \($0)" } + ["corrupt", "missing file"])
    }

    func testManifestResumeContinuesTheSameStream() throws {
        let scratch = ScratchDirectory("pea-resume")
        let path = try makeManifest(scratch, goodCount: 10)
        let reference = try TrainingDataset(source: .manifest(path: path), resolution: 4, seed: 99)
        let stream = try reference.nextBatch(35)
        for cut in [0, 1, 9, 10, 11, 23] {
            let first = try TrainingDataset(source: .manifest(path: path), resolution: 4, seed: 99)
            _ = try first.nextBatch(cut)
            let saved = first.position.serialized()
            let resumed = try TrainingDataset(source: .manifest(path: path), resolution: 4, seed: 99)
            try resumed.restore(TrainingDataPosition(serialized: saved))
            XCTAssertEqual(resumed.position, first.position)
            let rest = try resumed.nextBatch(35 - cut)
            XCTAssertEqual(rest.map(\.id), stream[cut...].map(\.id), "cut \(cut)")
            XCTAssertEqual(rest.map(\.text), stream[cut...].map(\.text), "cut \(cut)")
            XCTAssertEqual(rest.last?.image, stream.last?.image)
            XCTAssertEqual(resumed.skipped, reference.skipped, "cut \(cut)")
        }
        let other = try TrainingDataset(source: .manifest(path: path), resolution: 4, seed: 5)
        assertThrowsError(containing: ["seed 99"]) { try other.restore(reference.position) }
    }

    func testAnEpochWithoutUsableSamplesIsAnError() throws {
        let scratch = ScratchDirectory("pea-empty")
        let path = scratch.write("{\"image\": \"a.jpg\", \"text_en\": \"x\"}\n{\"image\": \"b.jpg\"}\n", to: "m.jsonl")
        let dataset = try TrainingDataset(source: .manifest(path: path), resolution: 8, seed: 0)
        assertThrowsError(containing: [path, "no usable sample"]) { try dataset.next() }
        XCTAssertEqual(dataset.skipped[.missingCaption], 2)
    }

    // MARK: - Tar datasets

    func testTarDatasetReadsPythonTarsInOrder() throws {
        let listing = try JSONValue.parse(XCTUnwrap(readFileBytes(Self.directory + "/tars.json"))).objectValue!
        let tensors = try SafeTensorsFile(path: Self.directory + "/tensors.safetensors")
        let shards = ["shard_gnu.tar", "shard_pax.tar"].map { Self.directory + "/" + $0 }
        let dataset = try TrainingDataset(source: .shards(shards), resolution: 16, seed: 3, shuffle: false)
        var expectedSkips = TrainingSkipCounts()
        var expectedSamples: [(id: String, sample: [String: JSONValue])] = []
        for (shardPath, shard) in zip(shards, ["shard_gnu.tar", "shard_pax.tar"]) {
            for value in listing[shard]!.objectValue!["samples"]!.arrayValue! {
                let sample = value.objectValue!
                if let reason = sample["skip"]?.stringValue {
                    expectedSkips.add(try XCTUnwrap(TrainingSkipReason(rawValue: reason)))
                } else {
                    expectedSamples.append((shardPath + "#" + sample["key"]!.stringValue!, sample))
                }
            }
        }
        let samples = try dataset.nextBatch(expectedSamples.count)
        XCTAssertEqual(dataset.epoch, 0)
        XCTAssertEqual(samples.map(\.id), expectedSamples.map(\.id))
        for (sample, (_, expected)) in zip(samples, expectedSamples) {
            XCTAssertEqual(sample.text, expected["text"]?.stringValue)
            XCTAssertEqual(sample.textEN, expected["text_en"]?.stringValue)
            XCTAssertEqual(sample.languageSpecific, expected["language_specific"]?.boolValue)
            let image = expected["image"]!.stringValue!
            let reference = try tensors.tensor("\(image).r16").floats()
            let worst = zip(try XCTUnwrap(sample.image).floats(), reference).map { abs($0 - $1) }.max()!
            XCTAssertLessThanOrEqual(worst, image.hasPrefix("jpeg") ? 2.0 / 255 + 1e-6 : 0, sample.id)
        }
        _ = try dataset.next()  // into epoch 1: every bad sample of epoch 0 was met
        XCTAssertEqual(dataset.skipped, expectedSkips)
    }

    /// Two shards of `count` small PNG samples each (keys k000…, captions "shard s sample i"), built here.
    func makeShards(_ scratch: ScratchDirectory, count: Int) throws -> [String] {
        try (0..<2).map { shard in
            var tar = TarBuilder()
            for index in 0..<count {
                let key = "k\(shard)\(threeDigits(index))"
                let rgb = (0..<(5 * 4 * 3)).map { UInt8(truncatingIfNeeded: $0 * 7 + index * 13 + shard * 101) }
                tar.add(name: key + ".png", data: try PNGWriter.encode(rgb: rgb, width: 5, height: 4, textChunks: [], path: key))
                if index % 7 == 3 {
                    tar.add(name: key + ".json", data: Array("{\"text_en\": \"only english\"}".utf8))  // missingCaption
                } else {
                    tar.add(name: key + ".txt", data: Array("shard \(shard) sample \(index)\n".utf8))
                }
            }
            return scratch.write(tar.finish(), to: "shard-\(shard).tar")
        }
    }

    func testTarShufflingIsDeterministicAndCoversEveryEpoch() throws {
        let scratch = ScratchDirectory("pea-tar-shuffle")
        let shards = try makeShards(scratch, count: 15)
        let usable = Set((0..<2).flatMap { shard in (0..<15).filter { $0 % 7 != 3 }.map { "shard \(shard) sample \($0)" } })
        func texts(seed: UInt64, buffer: Int) throws -> [String] {
            let dataset = try TrainingDataset(source: .shards(shards), resolution: 4, seed: seed, shuffleBufferSize: buffer)
            return try dataset.nextBatch(3 * usable.count).map(\.text)
        }
        let a = try texts(seed: 11, buffer: 8)
        XCTAssertEqual(a, try texts(seed: 11, buffer: 8))
        XCTAssertNotEqual(a, try texts(seed: 12, buffer: 8))
        for epoch in 0..<3 {
            XCTAssertEqual(Set(a[(epoch * usable.count)..<((epoch + 1) * usable.count)]), usable, "epoch \(epoch)")
        }
        XCTAssertNotEqual(Array(a[0..<usable.count]), Array(a[usable.count..<(2 * usable.count)]))
    }

    func testTarResumeReplaysToTheSamePosition() throws {
        let scratch = ScratchDirectory("pea-tar-resume")
        let shards = try makeShards(scratch, count: 12)
        let reference = try TrainingDataset(source: .shards(shards), resolution: 4, seed: 5, shuffleBufferSize: 6)
        let stream = try reference.nextBatch(50)
        for cut in [0, 1, 13, 20, 21, 33] {
            let first = try TrainingDataset(source: .shards(shards), resolution: 4, seed: 5, shuffleBufferSize: 6)
            _ = try first.nextBatch(cut)
            let resumed = try TrainingDataset(source: .shards(shards), resolution: 4, seed: 5, shuffleBufferSize: 6)
            var skipsDuringReplay = 0
            resumed.onSkip = { _ in skipsDuringReplay += 1 }
            try resumed.restore(TrainingDataPosition(serialized: first.position.serialized()))
            XCTAssertEqual(skipsDuringReplay, 0, "replay reports nothing")
            XCTAssertEqual(resumed.position, first.position)
            let rest = try resumed.nextBatch(50 - cut)
            XCTAssertEqual(rest.map(\.id), stream[cut...].map(\.id), "cut \(cut)")
            XCTAssertEqual(rest.first?.image, stream[cut].image)
            XCTAssertEqual(resumed.skipped, reference.skipped, "cut \(cut)")
        }
    }

    func testCorruptShardIsSkippedAndCounted() throws {
        let scratch = ScratchDirectory("pea-tar-corrupt")
        var shards = try makeShards(scratch, count: 4)
        var bytes = try XCTUnwrap(readFileBytes(shards[1]))
        bytes.removeSubrange(2000...)  // cut inside the shard
        shards[1] = scratch.write(bytes, to: "cut.tar")
        let dataset = try TrainingDataset(source: .shards(shards), resolution: 4, seed: 0, shuffle: false)
        var messages: [String] = []
        dataset.onSkip = { if $0.reason == .unreadableShard { messages.append($0.message) } }
        let texts = try dataset.nextBatch(4).map(\.text)
        XCTAssertEqual(Array(texts.prefix(3)), ["shard 0 sample 0", "shard 0 sample 1", "shard 0 sample 2"])
        XCTAssertEqual(dataset.skipped[.unreadableShard], 1)
        XCTAssertTrue(messages.first?.contains("cut.tar") ?? false, "\(messages)")
        assertThrowsError(containing: ["nope.tar"]) { try TrainingDataset(source: .shards([scratch.file("nope.tar")]), resolution: 4, seed: 0) }
    }

    // MARK: - Aspect buckets

    func testBucketParsingAndNearestAspect() throws {
        XCTAssertEqual(try AspectBuckets.parse("sdxl"), AspectBuckets.sdxl)
        XCTAssertEqual(AspectBuckets.sdxl.description, "448x896,448x832,512x768,576x704,640x640,704x576,768x512,832x448,896x448")
        XCTAssertEqual(try AspectBuckets.parse(" 24x16, 20X20,16x24").description, "24x16,20x20,16x24")
        for bad in ["", "24x16,", "24*16", "x16", "0x16", "-24x16", "8200x16", "200000x200000", "24x16,24x16", "sdxl,640x640"] {
            assertThrowsError(containing: ["aspect buckets"]) { try AspectBuckets.parse(bad) }
        }
        let buckets = try AspectBuckets.parse("24x16,20x20,16x24")
        XCTAssertEqual(buckets.nearest(width: 60, height: 33), 0)
        XCTAssertEqual(buckets.nearest(width: 41, height: 39), 1)
        XCTAssertEqual(buckets.nearest(width: 31, height: 45), 2)
        // a tie (1.25 is as far from 1.5 as from 1) goes to the first
        XCTAssertEqual(buckets.nearest(width: 5, height: 4), 0)
        XCTAssertEqual(AspectBuckets.sdxl.nearest(width: 1920, height: 1080), 7)   // 832x448 (1.86) is nearer 1.78 than 768x512 (1.5)
        // the authors' covering size: int(W·bh/H) when it covers bw, else the other side
        XCTAssertTrue(TrainingImageTransform.coveringSize(width: 60, height: 33, bucket: .init(width: 24, height: 16)) == (29, 16))
        XCTAssertTrue(TrainingImageTransform.coveringSize(width: 41, height: 39, bucket: .init(width: 20, height: 20)) == (21, 20))
        XCTAssertTrue(TrainingImageTransform.coveringSize(width: 39, height: 41, bucket: .init(width: 20, height: 20)) == (20, 21))
    }

    func testBucketCropIsRecordedAndRandomCropsStayInside() throws {
        var random = SplitMix64(seed: 3)
        let image = RGBImage(width: 60, height: 33, pixels: (0..<(60 * 33 * 3)).map { _ in UInt8(random.uniform() * 255) })
        let buckets = try AspectBuckets.parse("24x16,16x24")
        let centered = TrainingImageTransform.shaped(image, to: .buckets(buckets, crop: .center), cropSeed: 0)
        XCTAssertEqual(centered.geometry, ImageGeometry(originalWidth: 60, originalHeight: 33, cropTop: 0, cropLeft: 2, width: 24, height: 16))
        XCTAssertEqual(centered.geometry.timeIds, [33, 60, 0, 2, 16, 24])
        XCTAssertEqual(centered.tensor.shape, [3, 16, 24])
        var lefts = Set<Int>()
        for seed in 0..<64 as Range<UInt64> {
            let (tensor, geometry) = TrainingImageTransform.shaped(image, to: .buckets(buckets, crop: .random), cropSeed: seed)
            XCTAssertEqual(geometry.cropTop, 0)
            XCTAssertTrue((0...5).contains(geometry.cropLeft))
            lefts.insert(geometry.cropLeft)
            // the tensor is the crop of the resized image at the recorded offset
            let resized = TrainingImageTransform.resize(image, width: 29, height: 16)
            let expected = TrainingImageTransform.normalizedTensor(TrainingImageTransform.crop(resized, top: 0, left: geometry.cropLeft, width: 24, height: 16))
            XCTAssertEqual(tensor, expected)
        }
        XCTAssertEqual(lefts, Set(0...5), "every offset is reachable")
        // the square shape records the centre crop of the resized image as SDXL's time_ids
        let square = TrainingImageTransform.shaped(image, to: .square(16), cropSeed: 0)
        XCTAssertEqual(square.geometry, ImageGeometry(originalWidth: 60, originalHeight: 33, cropTop: 0, cropLeft: 6, width: 16, height: 16))   // round(6.5) = 6
        XCTAssertEqual(square.tensor, TrainingImageTransform.tensor(from: image, resolution: 16))
    }

    /// A manifest of images of three aspect ratios (wide, tall, square), `count` of each, written here.
    func writeBucketCorpus(_ scratch: ScratchDirectory, count: Int) throws -> String {
        var lines: [String] = []
        for index in 0..<(3 * count) {
            let (width, height) = [(12, 6), (6, 12), (9, 9)][index % 3]
            let rgb = (0..<(width * height * 3)).map { UInt8(truncatingIfNeeded: $0 * 5 + index * 29) }
            try PNGWriter.write(rgb: rgb, width: width, height: height, to: scratch.file("i\(index).png"))
            lines.append("{\"image\": \"i\(index).png\", \"text\": \"sample \(index)\"}")
        }
        return scratch.write(lines.joined(separator: "\n") + "\n", to: "buckets.jsonl")
    }

    func testBucketedBatchesHoldOneBucketDropLeftoversAndResumeExactly() throws {
        let scratch = ScratchDirectory("pea-buckets")
        let manifest = try writeBucketCorpus(scratch, count: 5)
        var tar = TarBuilder()
        for index in 0..<15 {
            let (width, height) = [(12, 6), (6, 12), (9, 9)][index % 3]
            let rgb = (0..<(width * height * 3)).map { UInt8(truncatingIfNeeded: $0 * 3 + index * 17) }
            tar.add(name: "k\(threeDigits(index)).png", data: try PNGWriter.encode(rgb: rgb, width: width, height: height, textChunks: [], path: "k"))
            tar.add(name: "k\(threeDigits(index)).txt", data: Array("sample \(index)".utf8))
        }
        let shard = scratch.write(tar.finish(), to: "buckets.tar")
        let shape = TrainingImageShape.buckets(try AspectBuckets.parse("8x4,4x8,6x6"), crop: .random)
        for source in [TrainingDataSource.manifest(path: manifest), .shards([shard])] {
            func dataset() throws -> TrainingDataset { try TrainingDataset(source: source, shape: shape, seed: 9, shuffleBufferSize: 4) }
            let reference = try dataset()
            var batches: [[TrainingSample]] = []
            var pendingSeen = false
            for _ in 0..<14 {
                batches.append(try reference.nextBatch(2))
                pendingSeen = pendingSeen || !reference.position.pending.isEmpty
            }
            XCTAssertTrue(pendingSeen, "\(source): some cut leaves samples waiting in a bucket")
            for batch in batches {
                XCTAssertEqual(Set(batch.map { "\($0.geometry.width)x\($0.geometry.height)" }).count, 1, "one bucket per batch")
            }
            // 5 images per bucket and epoch: two batches each, the fifth is dropped, so an epoch gives 6 batches
            // and no image twice in one.
            XCTAssertEqual(reference.epoch, 2)
            let firstEpoch = batches.prefix(6).flatMap { $0.map(\.id) }
            XCTAssertEqual(Set(firstEpoch).count, 12)
            for cut in [1, 2, 5, 6, 7, 11] {
                let first = try dataset()
                for _ in 0..<cut { _ = try first.nextBatch(2) }
                let resumed = try dataset()
                try resumed.restore(TrainingDataPosition(serialized: first.position.serialized()))
                XCTAssertEqual(resumed.position, first.position, "\(source) cut \(cut)")
                for expected in batches[cut...] {
                    let batch = try resumed.nextBatch(2)
                    XCTAssertEqual(batch.map(\.id), expected.map(\.id), "\(source) cut \(cut)")
                    XCTAssertEqual(batch.map(\.image), expected.map(\.image))
                    XCTAssertEqual(batch.map(\.geometry), expected.map(\.geometry))
                }
            }
            // a position with waiting samples does not fit a run without buckets
            let first = try dataset()
            while first.position.pending.isEmpty { _ = try first.nextBatch(2) }
            let square = try TrainingDataset(source: source, resolution: 4, seed: 9, shuffleBufferSize: 4)
            assertThrowsError(containing: ["aspect buckets"]) { try square.restore(first.position) }
        }
        // more buckets than the data fills: an error that says what to change
        let sparse = try TrainingDataset(source: .manifest(path: manifest), shape: shape, seed: 9)
        assertThrowsError(containing: ["filled no aspect bucket with a batch of 6", "--batch-size"]) { try sparse.nextBatch(6) }
    }

    // MARK: - Latent cache

    /// A geometry for samples whose images a test does not need decoded.
    static let anyGeometry = ImageGeometry(originalWidth: 48, originalHeight: 40, cropTop: 0, cropLeft: 4, width: 4, height: 4)

    func testLatentCacheStoresAndLoadsByIdAndShape() throws {
        let scratch = ScratchDirectory("pea-latents")
        let cache = try LatentCache(folder: scratch.file("cache/deeper"), namespace: "vae-a")
        let latent = HostTensor((0..<(4 * 3 * 5)).map { Float($0) * 0.25 - 3 }, shape: [4, 3, 5])
        let geometry = ImageGeometry(originalWidth: 61, originalHeight: 40, cropTop: 0, cropLeft: 3, width: 24, height: 16)
        let buckets = TrainingImageShape.buckets(try AspectBuckets.parse("24x16,16x24"), crop: .random)
        let key = buckets.cacheKey(seed: 5)
        XCTAssertNil(cache.load(id: "data/a.jpg", shape: key))
        try cache.store(latent, geometry: geometry, id: "data/a.jpg", shape: key)
        XCTAssertEqual(cache.load(id: "data/a.jpg", shape: key)?.latent, latent)
        XCTAssertEqual(cache.load(id: "data/a.jpg", shape: key)?.geometry, geometry)
        // another seed picks other random crops; another crop mode or square size is another key
        XCTAssertNil(cache.load(id: "data/a.jpg", shape: buckets.cacheKey(seed: 6)))
        XCTAssertNil(cache.load(id: "data/a.jpg", shape: TrainingImageShape.buckets(try AspectBuckets.parse("24x16,16x24"), crop: .center).cacheKey(seed: 5)))
        XCTAssertNil(cache.load(id: "data/a.jpg", shape: TrainingImageShape.square(512).cacheKey(seed: 5)))
        XCTAssertNil(cache.load(id: "data/b.jpg", shape: key))
        XCTAssertNil(try LatentCache(folder: scratch.file("cache/deeper"), namespace: "vae-b").load(id: "data/a.jpg", shape: key))
        // no temporary files left; the file is a safetensors file others can read
        let file = cache.path(id: "data/a.jpg", shape: key)
        let folder = String(file[..<file.lastIndex(of: "/")!])
        XCTAssertEqual(listDirectory(folder), [String(file[file.index(after: file.lastIndex(of: "/")!)...])])
        XCTAssertEqual(try SafeTensorsFile(path: file).metadata["id"], "data/a.jpg")
        XCTAssertEqual(try SafeTensorsFile(path: file).metadata["geometry"], "40,61,0,3,16,24")
        // a damaged file is a miss, and the next store replaces it
        writeFileBytes([1, 2, 3], to: file)
        XCTAssertNil(cache.load(id: "data/a.jpg", shape: key))
        try cache.store(latent, geometry: geometry, id: "data/a.jpg", shape: key)
        XCTAssertEqual(cache.load(id: "data/a.jpg", shape: key)?.latent, latent)
        // a file without geometry (an older Pea's) is a miss too
        try SafeTensorsWriter.write([(name: "latent", tensor: latent)], metadata: ["id": "data/a.jpg", "shape": key, "namespace": "vae-a"], to: file)
        XCTAssertNil(cache.load(id: "data/a.jpg", shape: key))
        assertThrowsError(containing: ["f32 [C, h, w]"]) { try cache.store(HostTensor([1, 2], shape: [2]), geometry: geometry, id: "x", shape: "1") }
    }

}

private func threeDigits(_ value: Int) -> String {
    let digits = String(value)
    return String(repeating: "0", count: max(0, 3 - digits.count)) + digits
}

/// Writes tar archives byte by byte: ustar headers (POSIX magic), optional prefix, base-256 sizes.
struct TarBuilder {
    private var bytes: [UInt8] = []

    mutating func add(name: String, prefix: String = "", data: [UInt8], type: Character = "0", base256Size: Bool = false) {
        var header = [UInt8](repeating: 0, count: 512)
        func put(_ text: String, at offset: Int) {
            for (index, byte) in text.utf8.enumerated() { header[offset + index] = byte }
        }
        func octal(_ value: Int, width: Int) -> String {
            let digits = String(value, radix: 8)
            return String(repeating: "0", count: width - 1 - digits.count) + digits
        }
        put(name, at: 0)
        put(octal(0o644, width: 8), at: 100)
        put(octal(0, width: 8), at: 108)
        put(octal(0, width: 8), at: 116)
        if base256Size {
            header[124] = 0x80
            var size = data.count
            for index in stride(from: 135, to: 124, by: -1) {
                header[index] = UInt8(size & 0xFF)
                size >>= 8
            }
        } else {
            put(octal(data.count, width: 12), at: 124)
        }
        put(octal(1_700_000_000, width: 12), at: 136)
        header[156] = type.asciiValue!
        put("ustar", at: 257)
        put("00", at: 263)
        put(prefix, at: 345)
        for index in 148..<156 { header[index] = 0x20 }
        let checksum = header.reduce(0) { $0 + Int($1) }
        put(octal(checksum, width: 7), at: 148)
        header[155] = 0x20
        bytes += header
        bytes += data
        bytes += [UInt8](repeating: 0, count: (512 - data.count % 512) % 512)
    }

    func finish() -> [UInt8] { bytes + [UInt8](repeating: 0, count: 1024) }
}
