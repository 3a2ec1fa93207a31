// The toy world: 64×64 RGB images of one coloured shape on white, with English and Chinese captions.
//
// This mirrors tools/toyworld/world.py, the world's definition on the Python side (the teacher's training data).
// Both draw the same bytes: the coverage below repeats world.py's `coverage` operation for operation in Double,
// and Tests/PEADiffusionTests/ToyWorldTests.swift checks the drawings against ones world.py wrote
// (tools/toyworld/make_world_fixtures.py → Tests/Fixtures/toyworld/drawings.safetensors).

/// The world's six colours, in world.py's `COLOUR_NAMES` order.
public enum ToyColour: String, CaseIterable, Sendable {
    case red, green, blue, yellow, purple, orange

    /// The Chinese name used in captions (world.py's `COLOURS[name][0]`).
    public var chinese: String {
        switch self {
        case .red: return "红色"
        case .green: return "绿色"
        case .blue: return "蓝色"
        case .yellow: return "黄色"
        case .purple: return "紫色"
        case .orange: return "橙色"
        }
    }

    /// The colour's RGB value (world.py's `COLOURS[name][1]`).
    public var rgb: (red: UInt8, green: UInt8, blue: UInt8) {
        switch self {
        case .red: return (220, 40, 40)
        case .green: return (40, 170, 60)
        case .blue: return (40, 80, 220)
        case .yellow: return (235, 200, 40)
        case .purple: return (140, 60, 190)
        case .orange: return (240, 130, 30)
        }
    }
}

/// The world's four shapes, in world.py's `SHAPE_NAMES` order.
public enum ToyShape: String, CaseIterable, Sendable {
    /// The disc inscribed in the box.
    case circle
    /// The box itself.
    case square
    /// Apex at the top middle of the box, base along its bottom edge.
    case triangle
    /// A plus sign whose arms are a third of the box wide.
    case cross

    /// The Chinese name used in captions (world.py's `SHAPES[name]`).
    public var chinese: String {
        switch self {
        case .circle: return "圆形"
        case .square: return "正方形"
        case .triangle: return "三角形"
        case .cross: return "十字形"
        }
    }
}

/// One of the 24 classes: a colour and a shape.
public struct ToyClass: Hashable, Sendable, CustomStringConvertible {
    public let colour: ToyColour
    public let shape: ToyShape

    public init(_ colour: ToyColour, _ shape: ToyShape) {
        self.colour = colour
        self.shape = shape
    }

    /// The class's position in `ToyWorld.classes` (world.py's `CLASSES.index((colour, shape))`).
    public var index: Int {
        ToyColour.allCases.firstIndex(of: colour)! * ToyShape.allCases.count + ToyShape.allCases.firstIndex(of: shape)!
    }

    /// "red circle".
    public var description: String { "\(colour.rawValue) \(shape.rawValue)" }
}

/// A square box in pixel units, y down: top-left corner and side (world.py's `(x0, y0, side)`).
public struct ToyBox: Equatable, Sendable {
    public var x0: Double
    public var y0: Double
    public var side: Double

    public init(x0: Double, y0: Double, side: Double) {
        self.x0 = x0
        self.y0 = y0
        self.side = side
    }
}

/// One image of a corpus: its file (relative to the corpus folder), class, box and captions.
public struct ToyCorpusRecord: Equatable, Sendable {
    public let image: String
    public let toyClass: ToyClass
    public let box: ToyBox
    public let template: Int
    public let english: String
    public let chinese: String
}

/// The toy world's definition; it mirrors tools/toyworld/world.py (the reference: same colours, shapes, class
/// order, held-out classes, caption templates, and byte-identical drawings).
public enum ToyWorld {
    /// Images are `size` × `size` RGB (world.py's `SIZE`).
    public static let size = 64
    /// Each pixel's coverage is the covered fraction of `supersample` × `supersample` sample points.
    public static let supersample = 4
    /// A box's side is uniform in [minimumFraction, maximumFraction) × `size`.
    public static let minimumFraction = 0.30
    public static let maximumFraction = 0.60

    public static let colours: [ToyColour] = ToyColour.allCases
    public static let shapes: [ToyShape] = ToyShape.allCases

    /// All 24 classes, colour-major (world.py's `CLASSES`: red circle, red square, …, orange cross).
    public static let classes: [ToyClass] = ToyColour.allCases.flatMap { colour in ToyShape.allCases.map { ToyClass(colour, $0) } }

    /// The classes held out of the Chinese training data (world.py's `HELD_OUT`); the English teacher sees them.
    public static let heldOut: [ToyClass] = [ToyClass(.red, .cross), ToyClass(.green, .triangle),
                                             ToyClass(.blue, .circle), ToyClass(.yellow, .square)]

    /// The 20 classes a Chinese training corpus contains: `classes` without `heldOut`, in `classes` order.
    public static let trainingClasses: [ToyClass] = classes.filter { !heldOut.contains($0) }

    /// Parallel caption templates (world.py's `TEMPLATES`): `{c}`/`{s}` are the English colour and shape,
    /// `{zc}`/`{zs}` the Chinese ones. The first is the canonical prompt.
    public static let templates: [(english: String, chinese: String)] = [
        ("a {c} {s}", "一个{zc}的{zs}"),
        ("{c} {s}", "{zc}{zs}"),
        ("a {c} {s} on a white background", "白色背景上的一个{zc}{zs}"),
        ("a picture of a {c} {s}", "一张{zc}{zs}的图片"),
        ("a drawing of a {c} {s}", "画着一个{zc}的{zs}"),
        ("a simple {c} {s}", "一个简单的{zc}{zs}"),
    ]

    /// The English and Chinese captions of a class with template `template` (world.py's `caption`):
    /// template 0 gives ("a red circle", "一个红色的圆形").
    public static func caption(colour: ToyColour, shape: ToyShape, template: Int = 0) -> (english: String, chinese: String) {
        precondition(templates.indices.contains(template), "toy world caption template \(template) is not in 0..<\(templates.count)")
        let (english, chinese) = templates[template]
        func fill(_ text: String) -> String {
            text.replacingAll("{zc}", with: colour.chinese).replacingAll("{zs}", with: shape.chinese)
                .replacingAll("{c}", with: colour.rawValue).replacingAll("{s}", with: shape.rawValue)
        }
        return (fill(english), fill(chinese))
    }

    /// The class named like "red" and "circle", or nil.
    public static func toyClass(colour: String, shape: String) -> ToyClass? {
        guard let colour = ToyColour(rawValue: colour), let shape = ToyShape(rawValue: shape) else { return nil }
        return ToyClass(colour, shape)
    }

    /// The fraction of each pixel covered by `shape` in the box (x0, y0, side) (pixel units, y down), row-major
    /// `size · size` values, each a multiple of 1/supersample² (world.py's `coverage`, the same operations in
    /// the same order, so the values are identical).
    public static func coverage(shape: ToyShape, x0: Double, y0: Double, side: Double, size: Int = ToyWorld.size,
                                supersample: Int = ToyWorld.supersample) -> [Double] {
        coverage(shape: shape, x0: x0, y0: y0, width: side, height: side, size: size, supersample: supersample)
    }

    /// `coverage` for a box of its own width and height (the shape stretched to it), computed for the pixels in
    /// `rows` × `columns` only (the others are 0); with width == height and every pixel it is world.py's
    /// coverage. The classifier fits stretched shapes to blurred objects, near the object only.
    static func coverage(shape: ToyShape, x0: Double, y0: Double, width: Double, height: Double, size: Int,
                         supersample: Int, rows: Range<Int>? = nil, columns: Range<Int>? = nil) -> [Double] {
        let rows = (rows ?? 0..<size).clamped(to: 0..<size), columns = (columns ?? 0..<size).clamped(to: 0..<size)
        var counts = [Int](repeating: 0, count: size * size)
        let third = 1.0 / 3.0
        let twoThirds = 2 * third
        // Sample centres as world.py's (arange(n) + 0.5) / supersample; u depends on the column only, v on the
        // row only, so each is computed once.
        func position(_ sample: Int) -> Double { (Double(sample) + 0.5) / Double(supersample) }
        let sampleColumns = (columns.lowerBound * supersample)..<(columns.upperBound * supersample)
        let us = sampleColumns.map { (position($0) - x0) / width }
        for row in (rows.lowerBound * supersample)..<(rows.upperBound * supersample) {
            let v = (position(row) - y0) / height
            let vInside = v >= 0 && v <= 1
            let armH = v >= third && v <= twoThirds
            let dv = v - 0.5
            let base = (row / supersample) * size
            for (offset, u) in us.enumerated() {
                let inside = vInside && u >= 0 && u <= 1
                let covered: Bool
                switch shape {
                case .circle:
                    let du = u - 0.5
                    covered = du * du + dv * dv <= 0.25
                case .square:
                    covered = inside
                case .triangle:
                    covered = inside && abs(u - 0.5) <= 0.5 * v
                case .cross:
                    covered = inside && (armH || (u >= third && u <= twoThirds))
                }
                if covered { counts[base + (sampleColumns.lowerBound + offset) / supersample] += 1 }
            }
        }
        let perPixel = Double(supersample * supersample)
        return counts.map { Double($0) / perPixel }
    }

    /// The shape over white: `size · size · 3` RGB bytes, row-major (world.py's `draw`: each channel is
    /// a·rgb + (1−a)·255 for coverage a, rounded half to even, clipped to 0…255).
    public static func draw(colour: ToyColour, shape: ToyShape, x0: Double, y0: Double, side: Double) -> [UInt8] {
        let rgb = colour.rgb
        let channels = [Double(rgb.red), Double(rgb.green), Double(rgb.blue)]
        var image = [UInt8](repeating: 0, count: size * size * 3)
        for (pixel, a) in coverage(shape: shape, x0: x0, y0: y0, side: side).enumerated() {
            for channel in 0..<3 {
                let value = (a * channels[channel] + (1 - a) * 255.0).rounded(.toNearestOrEven)
                image[pixel * 3 + channel] = UInt8(min(max(value, 0), 255))
            }
        }
        return image
    }

    /// `draw` for a class and a box.
    public static func draw(_ toyClass: ToyClass, box: ToyBox) -> [UInt8] {
        draw(colour: toyClass.colour, shape: toyClass.shape, x0: box.x0, y0: box.y0, side: box.side)
    }

    /// A box inside the image: side uniform in [30%, 60%) of the width, top-left uniform where it fits (world.py's
    /// `random_box`, drawn from `random`: side, then x0, then y0).
    public static func randomBox(_ random: inout SplitMix64) -> ToyBox {
        let side = (minimumFraction + (maximumFraction - minimumFraction) * unitDouble(&random)) * Double(size)
        let x0 = unitDouble(&random) * (Double(size) - side)
        let y0 = unitDouble(&random) * (Double(size) - side)
        return ToyBox(x0: x0, y0: y0, side: side)
    }

    /// Uniform in [0, 1) with 53 random bits.
    static func unitDouble(_ random: inout SplitMix64) -> Double { Double(random.next() >> 11) * 0x1p-53 }

    /// The records of a Chinese training corpus: `perClass` images of each of the 20 `trainingClasses` (none of
    /// `heldOut`), round-robin over the classes (image i is of class i mod 20), each with a random box and a random
    /// template drawn from SplitMix64(seed). Images are named `images/NNNNN.png` (5 digits or more).
    public static func corpusRecords(perClass: Int, seed: UInt64) -> [ToyCorpusRecord] {
        var random = SplitMix64(seed: seed)
        var records: [ToyCorpusRecord] = []
        records.reserveCapacity(perClass * trainingClasses.count)
        for _ in 0..<max(perClass, 0) {
            for toyClass in trainingClasses {
                let box = randomBox(&random)
                let template = Int(random.next() % UInt64(templates.count))
                let (english, chinese) = caption(colour: toyClass.colour, shape: toyClass.shape, template: template)
                let number = String(records.count)
                let name = "images/" + String(repeating: "0", count: max(0, 5 - number.count)) + number + ".png"
                records.append(ToyCorpusRecord(image: name, toyClass: toyClass, box: box, template: template,
                                               english: english, chinese: chinese))
            }
        }
        return records
    }

    /// One manifest line (with its newline) in the format `pea train --data` reads:
    /// `{"image":"images/00000.png","text":"<Chinese>","text_en":"<English>"}`.
    public static func manifestLine(_ record: ToyCorpusRecord) -> String {
        JSONValue.object(["image": .string(record.image), "text": .string(record.chinese),
                          "text_en": .string(record.english)]).serialized() + "\n"
    }

    /// Writes a corpus into `directory` (created if missing): `images/NNNNN.png` for every record of
    /// `corpusRecords(perClass:seed:)`, then `train.jsonl`, one `manifestLine` per image. Every file is written
    /// atomically and the manifest last, so a failure leaves no manifest (or the previous one). The same
    /// arguments write byte-identical files. Returns the manifest's path.
    /// - Throws: `PEAError.invalidFile` naming the file or folder that could not be written.
    @discardableResult
    public static func writeCorpus(to directory: String, perClass: Int, seed: UInt64) throws -> String {
        let records = corpusRecords(perClass: perClass, seed: seed)
        try makeDirectories(directory + "/images")
        var manifest: [UInt8] = []
        for record in records {
            try PNGWriter.write(rgb: draw(record.toyClass, box: record.box), width: size, height: size,
                                to: directory + "/" + record.image)
            manifest += Array(manifestLine(record).utf8)
        }
        let path = directory + "/train.jsonl"
        try writeFileAtomically(to: path) { append in try append(manifest) }
        return path
    }
}

extension String {
    /// Every occurrence of `target` replaced by `replacement` (no Foundation).
    fileprivate func replacingAll(_ target: String, with replacement: String) -> String {
        guard !target.isEmpty else { return self }
        var result = "", rest = Substring(self)
        while let range = rest.firstRange(of: target) {
            result += rest[..<range.lowerBound]
            result += replacement
            rest = rest[range.upperBound...]
        }
        return result + rest
    }
}
