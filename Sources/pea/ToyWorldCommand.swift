import PEADiffusion

func runToyWorld(_ arguments: [String]) throws {
    // `pea toyworld SUB --help` prints the one help text all four subcommands share.
    if arguments.count > 1, CommandSpec.asksForHelp(Array(arguments.dropFirst())) { print(ToyWorldOptions.spec.help); return }
    try Subcommands(command: "toyworld", usage: ToyWorldOptions.spec.help, table: [
        "corpus": runToyWorldCorpus, "classify": runToyWorldClassify, "grid": runToyWorldGrid, "draw": runToyWorldDraw,
    ]).run(arguments)
}

/// `pea toyworld`'s options, declared once for its parsers and its help; each subcommand takes its own subset.
enum ToyWorldOptions {
    static let output = CommandOption.value("--output", "PATH", help: "(corpus, grid, draw) the folder or PNG to write")
    static let perClass = CommandOption.value("--per-class", "N", default: "80", .range(1...1_000_000),
                                              help: "(corpus) images per class")
    static let seed = CommandOption.value("--seed", "S", default: "0", help: "(corpus) seed of the boxes and caption templates")
    static let json = CommandOption.flag("--json", help: "(classify) one JSON object per line")
    static let columns = CommandOption.value("--columns", "N", .range(1...10_000), help: "(grid) images per row")
    static let colour = CommandOption.value("--colour", "C", .choices(ToyColour.allCases.map(\.rawValue)),
                                            help: "(draw) " + ToyColour.allCases.map(\.rawValue).joined(separator: " | "))
    static let shape = CommandOption.value("--shape", "S", .choices(ToyShape.allCases.map(\.rawValue)),
                                           help: "(draw) " + ToyShape.allCases.map(\.rawValue).joined(separator: " | "))
    static let x0 = CommandOption.value("--x0", "X", help: "(draw) the box's left and top edges and side, in pixels",
                                        label: "--x0 X --y0 Y --side SIDE")
    static let y0 = CommandOption.value("--y0", "Y", help: nil)   // in --x0's row
    static let side = CommandOption.value("--side", "SIDE", default: "32", help: nil)

    static let spec = CommandSpec(
        name: "toyworld",
        usage: ["pea toyworld corpus --output DIR [--per-class N] [--seed S]",
                "pea toyworld classify IMAGE.png [IMAGE.png …] [--json]",
                "pea toyworld grid --columns N --output OUT.png IMAGE.png [IMAGE.png …]",
                "pea toyworld draw --colour C --shape S --output OUT.png [--x0 X --y0 Y --side SIDE]"],
        description: """
            The toy world (tools/toyworld/world.py): 64×64 images of one coloured shape on white, 6 colours (red green blue
            yellow purple orange) × 4 shapes (circle square triangle cross), English and Chinese captions. Red cross, green
            triangle, blue circle and yellow square are held out of the Chinese training data.

              corpus     a Chinese training corpus of the 20 other classes: DIR/images/NNNNN.png and DIR/train.jsonl, one
                         {"image", "text" (Chinese), "text_en" (English)} line per image, what 'pea train --data' reads.
                         --per-class N images per class (default 80), random boxes and caption templates from --seed S
                         (default 0); the same seed writes the same bytes. Prints the manifest's path.
              classify   names the colour and shape in each image (a fixed classifier: ink threshold, largest component,
                         nearest palette colour, best-fitting ideal shape): one line per image, PATH<TAB>colour<TAB>shape,
                         or PATH<TAB>none when no object is found; with --json one object per line
                         {"colour": …, "path": …, "shape": …} (null colour and shape when none is found).
              grid       tiles same-size images row-major, --columns per row, with a 2-pixel white gutter, into one PNG.
              draw       one drawing of the world; the box (pixels, y down) defaults to a centred one of side 32.
            """,
        groups: [.init("Options", [output, perClass, seed, json, columns, colour, shape, x0, y0, side])])
}

private func runToyWorldCorpus(_ arguments: [String]) throws {
    let command = "toyworld corpus"
    typealias O = ToyWorldOptions
    let options = try ParsedOptions(arguments, command: command, options: [O.output, O.perClass, O.seed])
    let output = try options.string(O.output)
    let perClass = try options.int(O.perClass)
    let seedText = try options.string(O.seed)
    guard let seed = UInt64(seedText) else {
        throw PEAError.usage("\(command): option '--seed' expects a non-negative integer, got '\(seedText)'")
    }
    print(try ToyWorld.writeCorpus(to: output, perClass: perClass, seed: seed))
}

private func runToyWorldClassify(_ arguments: [String]) throws {
    let command = "toyworld classify"
    let options = try ParsedOptions(arguments, command: command, options: [ToyWorldOptions.json], positionals: true)
    let paths = options.positionals
    guard !paths.isEmpty else { throw PEAError.usage("\(command): no images given") }
    for path in paths {
        let image = try PNGDecoder.decode(path: path).rgb()
        let result = ToyWorldClassifier.classify(image)
        if options.has(ToyWorldOptions.json) {
            let object: [String: JSONValue] = ["path": .string(path),
                                               "colour": result.map { .string($0.colour.rawValue) } ?? .null,
                                               "shape": result.map { .string($0.shape.rawValue) } ?? .null]
            print(JSONValue.object(object).serialized())
        } else if let result {
            print("\(path)\t\(result.colour.rawValue)\t\(result.shape.rawValue)")
        } else {
            print("\(path)\tnone")
        }
    }
}

private func runToyWorldGrid(_ arguments: [String]) throws {
    let command = "toyworld grid"
    typealias O = ToyWorldOptions
    let options = try ParsedOptions(arguments, command: command, options: [O.columns, O.output], positionals: true)
    let paths = options.positionals
    let output = try options.string(O.output)
    let columns = try options.int(O.columns)
    guard !paths.isEmpty else { throw PEAError.usage("\(command): no images given") }
    let images = try paths.map { try PNGDecoder.decode(path: $0).rgb() }
    let grid = try RGBImage.tiled(images, columns: columns, names: paths)
    try PNGWriter.write(rgb: grid.pixels, width: grid.width, height: grid.height, to: output)
    print(output)
}

private func runToyWorldDraw(_ arguments: [String]) throws {
    let command = "toyworld draw"
    typealias O = ToyWorldOptions
    let options = try ParsedOptions(arguments, command: command, options: [O.colour, O.shape, O.output, O.x0, O.y0, O.side])
    let colour = ToyColour(rawValue: try options.string(O.colour))!
    let shape = ToyShape(rawValue: try options.string(O.shape))!
    let output = try options.string(O.output)
    let side = try options.double(O.side)
    guard side > 0 else { throw PEAError.usage("\(command): option '--side' must be positive, got \(side)") }
    let x0 = try options.optionalDouble(O.x0) ?? (Double(ToyWorld.size) - side) / 2
    let y0 = try options.optionalDouble(O.y0) ?? (Double(ToyWorld.size) - side) / 2
    let rgb = ToyWorld.draw(colour: colour, shape: shape, x0: x0, y0: y0, side: side)
    try PNGWriter.write(rgb: rgb, width: ToyWorld.size, height: ToyWorld.size, to: output)
    print(output)
}
