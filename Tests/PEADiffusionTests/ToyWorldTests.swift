#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import XCTest
@testable import PEADiffusion

/// The toy world (ToyWorld.swift) against world.py's own drawings (tools/toyworld/make_world_fixtures.py), its
/// classifier on clean, noisy and degraded drawings, and the `pea toyworld` commands.
final class ToyWorldTests: XCTestCase {
    static let fixturePath = fixturesDirectory() + "/toyworld/drawings.safetensors"

    // MARK: - The definition against world.py

    func testDefinitionMatchesWorldPy() throws {
        let fixture = try RawSafeTensors(path: Self.fixturePath)
        XCTAssertEqual(try jsonStrings(fixture.metadata["colours"]), ToyColour.allCases.map(\.rawValue))
        XCTAssertEqual(try jsonStrings(fixture.metadata["shapes"]), ToyShape.allCases.map(\.rawValue))
        XCTAssertEqual(ToyWorld.classes.count, 24)
        XCTAssertEqual(ToyWorld.classes.map(\.index), Array(0..<24))
        XCTAssertEqual(ToyWorld.classes[0], ToyClass(.red, .circle))
        XCTAssertEqual(ToyWorld.classes[23], ToyClass(.orange, .cross))
        XCTAssertEqual(ToyWorld.heldOut.map(\.description), ["red cross", "green triangle", "blue circle", "yellow square"])
        XCTAssertEqual(ToyWorld.trainingClasses.count, 20)
        XCTAssertTrue(ToyWorld.trainingClasses.allSatisfy { !ToyWorld.heldOut.contains($0) })

        XCTAssertTrue(ToyWorld.caption(colour: .red, shape: .circle) == ("a red circle", "一个红色的圆形"))
        XCTAssertTrue(ToyWorld.caption(colour: .purple, shape: .cross, template: 1) == ("purple cross", "紫色十字形"))
        XCTAssertTrue(ToyWorld.caption(colour: .orange, shape: .square, template: 2)
                      == ("a orange square on a white background", "白色背景上的一个橙色正方形"))
        XCTAssertTrue(ToyWorld.caption(colour: .green, shape: .triangle, template: 3) == ("a picture of a green triangle", "一张绿色三角形的图片"))
        XCTAssertTrue(ToyWorld.caption(colour: .blue, shape: .circle, template: 4) == ("a drawing of a blue circle", "画着一个蓝色的圆形"))
        XCTAssertTrue(ToyWorld.caption(colour: .yellow, shape: .square, template: 5) == ("a simple yellow square", "一个简单的黄色正方形"))
    }

    func testDrawingsEqualWorldPyByteForByte() throws {
        let fixture = try RawSafeTensors(path: Self.fixturePath)
        let boxes = try fixture.doubles("boxes"), labels = try fixture.integers("labels"), digests = try fixture.unsigned("digests")
        XCTAssertEqual(labels.count, 240)
        XCTAssertEqual(Set(labels), Set(0..<24), "every class is drawn")
        XCTAssertEqual(boxes.count, labels.count * 3)
        XCTAssertEqual(digests.count, labels.count)
        for (i, label) in labels.enumerated() {
            let drawing = ToyWorld.draw(ToyWorld.classes[label], box: Self.box(boxes, i))
            XCTAssertEqual(drawing.count, 64 * 64 * 3)
            XCTAssertEqual(FNV1a.hash64(drawing), digests[i], "drawing \(i) (\(ToyWorld.classes[label]), box \(Self.box(boxes, i))) differs from world.py's")
        }
        // The drawings stored in full: byte for byte, naming the first differing byte.
        let indices = try fixture.integers("image_indices"), images = try fixture.bytes("images")
        XCTAssertEqual(images.count, indices.count * 64 * 64 * 3)
        for (k, i) in indices.enumerated() {
            let expected = Array(images[(k * 12288)..<((k + 1) * 12288)])
            let drawing = ToyWorld.draw(ToyWorld.classes[labels[i]], box: Self.box(boxes, i))
            if let first = zip(drawing, expected).enumerated().first(where: { $0.element.0 != $0.element.1 }) {
                let pixel = first.offset / 3
                XCTFail("drawing \(i): pixel (x \(pixel % 64), y \(pixel / 64)) channel \(first.offset % 3) is \(first.element.0), world.py drew \(first.element.1)")
            }
            XCTAssertEqual(FNV1a.hash64(expected), digests[i], "the fixture's digest of drawing \(i)")
        }
    }

    func testCoverageIsWholeSixteenthsAndFillsTheBox() {
        let square = ToyWorld.coverage(shape: .square, x0: 10, y0: 20, side: 16)
        XCTAssertEqual(square.reduce(0, +), 256, accuracy: 1e-12)
        XCTAssertTrue(square.allSatisfy { ($0 * 16).rounded() == $0 * 16 })
        XCTAssertEqual(square[20 * 64 + 10], 1)
        XCTAssertEqual(square[19 * 64 + 10], 0)
        XCTAssertEqual(square[35 * 64 + 25], 1)
        XCTAssertEqual(square[36 * 64 + 25], 0)
    }

    // MARK: - Classifier

    func testClassifierIsRightOnEveryFixtureDrawingCleanAndNoisy() throws {
        let fixture = try RawSafeTensors(path: Self.fixturePath)
        let boxes = try fixture.doubles("boxes"), labels = try fixture.integers("labels")
        var random = SplitMix64(seed: 7)
        var worstMargin = Double.infinity
        for (i, label) in labels.enumerated() {
            let expected = ToyWorld.classes[label]
            let clean = ToyWorld.draw(expected, box: Self.box(boxes, i))
            let result = ToyWorldClassifier.classify(rgb: clean, width: 64, height: 64)
            XCTAssertEqual(result?.toyClass, expected, "clean drawing \(i), box \(Self.box(boxes, i))")
            if let result { worstMargin = min(worstMargin, result.iou - result.runnerUpIoU) }
            let noisy = Self.addingNoise(clean, sigma: 25, &random)
            let noisyResult = ToyWorldClassifier.classify(rgb: noisy, width: 64, height: 64)
            XCTAssertEqual(noisyResult?.toyClass, expected, "drawing \(i) with noise σ 25, box \(Self.box(boxes, i)): \(String(describing: noisyResult))")
        }
        XCTAssertGreaterThan(worstMargin, 0.05, "the shape decision on clean drawings is clear")
    }

    func testClassifierToleratesBlurTintAndOtherSizes() throws {
        let fixture = try RawSafeTensors(path: Self.fixturePath)
        let boxes = try fixture.doubles("boxes"), labels = try fixture.integers("labels")
        for i in stride(from: 0, to: labels.count, by: 3) {
            let expected = ToyWorld.classes[labels[i]]
            let clean = ToyWorld.draw(expected, box: Self.box(boxes, i))
            // A 3×3 box blur, then a faint warm tint of the whole image.
            var degraded = Self.blurred(clean)
            for p in 0..<(64 * 64) {
                degraded[3 * p + 1] = UInt8(max(0, Int(degraded[3 * p + 1]) - 8))
                degraded[3 * p + 2] = UInt8(max(0, Int(degraded[3 * p + 2]) - 16))
            }
            XCTAssertEqual(ToyWorldClassifier.classify(rgb: degraded, width: 64, height: 64)?.toyClass, expected,
                           "drawing \(i) blurred and tinted")
            // Upscaled 2× (nearest): the classifier resamples to 64×64.
            var large = [UInt8](repeating: 0, count: 128 * 128 * 3)
            for y in 0..<128 {
                for x in 0..<128 {
                    for c in 0..<3 { large[(y * 128 + x) * 3 + c] = clean[((y / 2) * 64 + x / 2) * 3 + c] }
                }
            }
            XCTAssertEqual(ToyWorldClassifier.classify(rgb: large, width: 128, height: 128)?.toyClass, expected,
                           "drawing \(i) at 128×128")
        }
    }

    func testClassifierFindsNothingOnBlankImages() {
        let white = [UInt8](repeating: 255, count: 64 * 64 * 3)
        XCTAssertNil(ToyWorldClassifier.classify(rgb: white, width: 64, height: 64))
        var random = SplitMix64(seed: 3)
        XCTAssertNil(ToyWorldClassifier.classify(rgb: Self.addingNoise(white, sigma: 25, &random), width: 64, height: 64),
                     "noise alone is not an object")
        XCTAssertNil(ToyWorldClassifier.classify(rgb: [UInt8](repeating: 240, count: 64 * 64 * 3), width: 64, height: 64),
                     "a flat grey tint is not an object")
        XCTAssertNil(ToyWorldClassifier.classify(rgb: white, width: 64, height: 32), "wrong byte count")
    }

    // MARK: - Commands

    func testCorpusCommandIsDeterministicAndExcludesHeldOutClasses() throws {
        let scratch = ScratchDirectory("pea-toyworld")
        let first = try runPea(["toyworld", "corpus", "--output", scratch.file("a"), "--per-class", "4", "--seed", "11"])
        XCTAssertEqual(first.status, 0, first.stderr)
        XCTAssertEqual(first.stdout, scratch.file("a") + "/train.jsonl\n")
        let second = try runPea(["toyworld", "corpus", "--output", scratch.file("b"), "--per-class", "4", "--seed", "11"])
        XCTAssertEqual(second.status, 0, second.stderr)
        let other = try runPea(["toyworld", "corpus", "--output", scratch.file("c"), "--per-class", "4", "--seed", "12"])
        XCTAssertEqual(other.status, 0, other.stderr)

        let manifest = try XCTUnwrap(readFileBytes(scratch.file("a/train.jsonl")))
        XCTAssertEqual(readFileBytes(scratch.file("b/train.jsonl")), manifest, "same seed, same manifest")
        XCTAssertNotEqual(readFileBytes(scratch.file("c/train.jsonl")), manifest, "another seed, another corpus")
        let images = listDirectory(scratch.file("a/images"))
        XCTAssertEqual(images.count, 80)
        XCTAssertEqual(images.first, "00000.png")
        XCTAssertEqual(listDirectory(scratch.file("b/images")), images)
        for name in images {
            XCTAssertEqual(readFileBytes(scratch.file("b/images/" + name)), readFileBytes(scratch.file("a/images/" + name)), name)
        }
        XCTAssertEqual(listDirectory(scratch.file("a")), ["images", "train.jsonl"], "no temporary files left")

        // Every line: the three fields, captions of a training class from one template pair.
        let lines = String(decoding: manifest, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        XCTAssertEqual(lines.count, 81)
        XCTAssertEqual(lines.last, "")
        var canonical = 0
        var seen = Set<ToyClass>()
        for (index, line) in lines.dropLast().enumerated() {
            let object = try XCTUnwrap(JSONValue.parse(String(line)).objectValue, "line \(index + 1)")
            XCTAssertEqual(Set(object.keys), ["image", "text", "text_en"])
            let number = String(index)
            XCTAssertEqual(object["image"]?.stringValue, "images/" + String(repeating: "0", count: 5 - number.count) + number + ".png")
            let text = try XCTUnwrap(object["text"]?.stringValue), english = try XCTUnwrap(object["text_en"]?.stringValue)
            let matches = ToyWorld.classes.flatMap { toyClass in
                ToyWorld.templates.indices.compactMap { template -> (ToyClass, Int)? in
                    ToyWorld.caption(colour: toyClass.colour, shape: toyClass.shape, template: template) == (english, text)
                        ? (toyClass, template) : nil
                }
            }
            XCTAssertEqual(matches.count, 1, "line \(index + 1): \(line)")
            guard let (toyClass, template) = matches.first else { continue }
            XCTAssertFalse(ToyWorld.heldOut.contains(toyClass), "line \(index + 1) is of held-out \(toyClass)")
            XCTAssertEqual(toyClass, ToyWorld.trainingClasses[index % 20])
            seen.insert(toyClass)
            if template == 0 {
                canonical += 1
                XCTAssertEqual(english, "a \(toyClass.colour.rawValue) \(toyClass.shape.rawValue)")
                XCTAssertEqual(text, "一个\(toyClass.colour.chinese)的\(toyClass.shape.chinese)")
            }
            // The image is of that class.
            let image = try PNGDecoder.decode(path: scratch.file("a/" + (object["image"]?.stringValue ?? ""))).rgb()
            XCTAssertEqual(image.width, 64)
            XCTAssertEqual(ToyWorldClassifier.classify(image)?.toyClass, toyClass, "line \(index + 1)")
        }
        XCTAssertEqual(seen, Set(ToyWorld.trainingClasses))
        XCTAssertGreaterThan(canonical, 0, "some lines use the canonical template")
        XCTAssertTrue(ToyWorld.caption(colour: .red, shape: .circle, template: 0) == ("a red circle", "一个红色的圆形"))

        // What `pea train --data` reads.
        let loaded = try TrainingManifest(path: scratch.file("a/train.jsonl"))
        XCTAssertEqual(loaded.records.count, 80)
        XCTAssertEqual(loaded.records[0].textEN, ToyWorld.corpusRecords(perClass: 4, seed: 11)[0].english)

        let missing = try runPea(["toyworld", "corpus", "--per-class", "4"])
        XCTAssertEqual(missing.status, 2)
        XCTAssertTrue(missing.stderr.contains("--output"), missing.stderr)
    }

    func testClassifyCommandPrintsOneLinePerImage() throws {
        let scratch = ScratchDirectory("pea-toyworld")
        let circle = scratch.file("circle.png"), blank = scratch.file("blank.png")
        try PNGWriter.write(rgb: ToyWorld.draw(colour: .blue, shape: .circle, x0: 12.5, y0: 20, side: 30), width: 64, height: 64, to: circle)
        try PNGWriter.write(rgb: [UInt8](repeating: 255, count: 64 * 64 * 3), width: 64, height: 64, to: blank)

        let plain = try runPea(["toyworld", "classify", circle, blank])
        XCTAssertEqual(plain.status, 0, plain.stderr)
        XCTAssertEqual(plain.stdout, "\(circle)\tblue\tcircle\n\(blank)\tnone\n")

        let json = try runPea(["toyworld", "classify", "--json", circle, blank])
        XCTAssertEqual(json.status, 0, json.stderr)
        let lines = json.stdout.split(separator: "\n")
        XCTAssertEqual(lines.count, 2)
        let first = try XCTUnwrap(JSONValue.parse(String(lines[0])).objectValue)
        XCTAssertEqual(first["path"]?.stringValue, circle)
        XCTAssertEqual(first["colour"]?.stringValue, "blue")
        XCTAssertEqual(first["shape"]?.stringValue, "circle")
        let second = try XCTUnwrap(JSONValue.parse(String(lines[1])).objectValue)
        XCTAssertEqual(second["path"]?.stringValue, blank)
        XCTAssertEqual(second["colour"], .null)
        XCTAssertEqual(second["shape"], .null)

        let broken = scratch.write("not a png", to: "broken.png")
        let bad = try runPea(["toyworld", "classify", circle, broken])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains(broken), bad.stderr)
        let missing = try runPea(["toyworld", "classify", scratch.file("missing.png")])
        XCTAssertNotEqual(missing.status, 0)
        XCTAssertTrue(missing.stderr.contains(scratch.file("missing.png")), missing.stderr)
        let none = try runPea(["toyworld", "classify"])
        XCTAssertEqual(none.status, 2)
    }

    func testGridCommandTilesRowMajorWithAGutter() throws {
        let scratch = ScratchDirectory("pea-toyworld")
        var paths: [String] = []
        for (index, toyClass) in [ToyClass(.red, .square), ToyClass(.green, .circle), ToyClass(.purple, .cross)].enumerated() {
            let path = scratch.file("\(index).png")
            try PNGWriter.write(rgb: ToyWorld.draw(toyClass, box: ToyBox(x0: 0, y0: 0, side: 64)), width: 64, height: 64, to: path)
            paths.append(path)
        }
        let output = scratch.file("grid.png")
        let result = try runPea(["toyworld", "grid", "--columns", "2", "--output", output] + paths)
        XCTAssertEqual(result.status, 0, result.stderr)
        let grid = try PNGDecoder.decode(path: output).rgb()
        XCTAssertEqual(grid.width, 2 * 64 + 2)
        XCTAssertEqual(grid.height, 2 * 64 + 2)
        func pixel(_ x: Int, _ y: Int) -> [UInt8] { Array(grid.pixels[((y * grid.width + x) * 3)..<((y * grid.width + x) * 3 + 3)]) }
        XCTAssertEqual(pixel(0, 0), [220, 40, 40], "first image top-left")
        XCTAssertEqual(pixel(63, 63), [220, 40, 40])
        XCTAssertEqual(pixel(64, 10), [255, 255, 255], "gutter")
        XCTAssertEqual(pixel(65, 10), [255, 255, 255], "gutter")
        XCTAssertEqual(pixel(66 + 32, 32), [40, 170, 60], "second image's centre")
        XCTAssertEqual(pixel(32, 64), [255, 255, 255], "gutter between rows")
        XCTAssertEqual(pixel(32, 66 + 32), [140, 60, 190], "third image, second row")
        XCTAssertEqual(pixel(66 + 32, 66 + 32), [255, 255, 255], "empty cell")

        let small = scratch.file("small.png")
        try PNGWriter.write(rgb: [UInt8](repeating: 255, count: 32 * 32 * 3), width: 32, height: 32, to: small)
        let mismatch = try runPea(["toyworld", "grid", "--columns", "2", "--output", scratch.file("bad.png"), paths[0], small])
        XCTAssertNotEqual(mismatch.status, 0)
        XCTAssertTrue(mismatch.stderr.contains(small) && mismatch.stderr.contains("32×32"), mismatch.stderr)
        XCTAssertFalse(fileExists(scratch.file("bad.png")))
        let noColumns = try runPea(["toyworld", "grid", "--output", scratch.file("bad.png"), paths[0]])
        XCTAssertEqual(noColumns.status, 2)
        XCTAssertTrue(noColumns.stderr.contains("--columns"), noColumns.stderr)
    }

    func testDrawCommandAndUsage() throws {
        let scratch = ScratchDirectory("pea-toyworld")
        let output = scratch.file("draw.png")
        let result = try runPea(["toyworld", "draw", "--colour", "orange", "--shape", "triangle", "--x0", "3.5", "--y0", "7",
                                 "--side", "30.25", "--output", output])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertEqual(try PNGDecoder.decode(path: output).rgb().pixels,
                       ToyWorld.draw(colour: .orange, shape: .triangle, x0: 3.5, y0: 7, side: 30.25))
        let badColour = try runPea(["toyworld", "draw", "--colour", "pink", "--shape", "circle", "--output", output])
        XCTAssertEqual(badColour.status, 2)
        XCTAssertTrue(badColour.stderr.contains("pink"), badColour.stderr)
        let help = try runPea(["toyworld", "--help"])
        XCTAssertEqual(help.status, 0)
        XCTAssertTrue(help.stdout.contains("pea toyworld corpus"), help.stdout)
        let unknown = try runPea(["toyworld", "paint"])
        XCTAssertEqual(unknown.status, 2)
        XCTAssertTrue(unknown.stderr.contains("paint"), unknown.stderr)
    }

    // MARK: - Helpers

    static func box(_ boxes: [Double], _ i: Int) -> ToyBox { ToyBox(x0: boxes[3 * i], y0: boxes[3 * i + 1], side: boxes[3 * i + 2]) }

    /// Gaussian noise (Box–Muller from SplitMix64) of standard deviation `sigma`, rounded and clamped to 0…255.
    static func addingNoise(_ image: [UInt8], sigma: Double, _ random: inout SplitMix64) -> [UInt8] {
        image.map { value in
            let u1 = (Double(random.next() >> 11) + 1) * 0x1p-53, u2 = Double(random.next() >> 11) * 0x1p-53
            let normal = (-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2)
            return UInt8(min(max((Double(value) + sigma * normal).rounded(), 0), 255))
        }
    }

    /// A 3×3 box blur of a 64×64 RGB image (edges use the pixels inside).
    static func blurred(_ image: [UInt8]) -> [UInt8] {
        var output = image
        for y in 0..<64 {
            for x in 0..<64 {
                for c in 0..<3 {
                    var sum = 0, count = 0
                    for ny in max(0, y - 1)...min(63, y + 1) {
                        for nx in max(0, x - 1)...min(63, x + 1) {
                            sum += Int(image[(ny * 64 + nx) * 3 + c])
                            count += 1
                        }
                    }
                    output[(y * 64 + x) * 3 + c] = UInt8((sum + count / 2) / count)
                }
            }
        }
        return output
    }
}

private func jsonStrings(_ text: String?) throws -> [String] {
    let values = try XCTUnwrap(JSONValue.parse(try XCTUnwrap(text)).arrayValue)
    return values.compactMap(\.stringValue)
}

/// A minimal safetensors reader for the dtypes SafeTensorsFile does not read (U8, U64, F64), little-endian.
private struct RawSafeTensors {
    let metadata: [String: String]
    private let entries: [String: (dtype: String, shape: [Int], bytes: ArraySlice<UInt8>)]

    init(path: String) throws {
        let file = try XCTUnwrap(readFileBytes(path), "cannot read \(path)")
        let length = Int(file[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
        let header = try XCTUnwrap(JSONValue.parse(Array(file[8..<(8 + length)])).objectValue)
        var metadata: [String: String] = [:]
        var entries: [String: (String, [Int], ArraySlice<UInt8>)] = [:]
        for (name, value) in header {
            let object = try XCTUnwrap(value.objectValue)
            if name == "__metadata__" {
                for (key, text) in object { metadata[key] = text.stringValue }
                continue
            }
            let offsets = try XCTUnwrap(object["data_offsets"]?.arrayValue).compactMap(\.intValue)
            entries[name] = (try XCTUnwrap(object["dtype"]?.stringValue), try XCTUnwrap(object["shape"]?.arrayValue).compactMap(\.intValue),
                             file[(8 + length + offsets[0])..<(8 + length + offsets[1])])
        }
        self.metadata = metadata
        self.entries = entries
    }

    private func raw(_ name: String, _ dtype: String) throws -> ArraySlice<UInt8> {
        let entry = try XCTUnwrap(entries[name], "no tensor \(name)")
        XCTAssertEqual(entry.dtype, dtype, name)
        return entry.bytes
    }

    private func words(_ name: String, _ dtype: String) throws -> [UInt64] {
        let bytes = Array(try raw(name, dtype))
        return stride(from: 0, to: bytes.count, by: 8).map { start in
            (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[start + $1]) << (8 * UInt64($1)) }
        }
    }

    func bytes(_ name: String) throws -> [UInt8] { Array(try raw(name, "U8")) }
    func unsigned(_ name: String) throws -> [UInt64] { try words(name, "U64") }
    func integers(_ name: String) throws -> [Int] { try words(name, "I64").map { Int(Int64(bitPattern: $0)) } }
    func doubles(_ name: String) throws -> [Double] { try words(name, "F64").map(Double.init(bitPattern:)) }
}
